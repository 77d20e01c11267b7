// A native thread that runs lists of CUDA VMM calls (map, set access, unmap) without the GIL.
//
// Loaded with ctypes (vllm_vattention/memory/native.py); plain C ABI, no Python headers. The
// driver entry points come in a table, so CPU tests pass the fake driver's functions and the GPU
// path passes libcuda's. Errors never abort: the first failing call's CUresult and a description
// are kept and returned by vattn_mapper_wait / vattn_mapper_poll, and the driver calls queued after
// it are dropped, except SIGNAL ops, which always run: a GPU stream may be waiting on that flag
// (cuStreamWaitValue32), and must not wait forever because a mapping failed.
//
// Op kinds: MAP, UNMAP, ACCESS_RW/RO (driver calls), WAIT_EVENT (cuEventSynchronize on `handle`:
// a step that still reads memory the next UNMAP removes), SIGNAL (store `handle` into the 32-bit
// host word at `va` with release ordering, after every earlier op of the queue has run), DRAIN
// (run background ops until `handle` of them have run), WAIT_VALUE (the same wait as WAIT_EVENT
// without a driver call: poll the 32-bit host word at `va`, which the GPU writes after each step
// (cuStreamWriteValue32), until it has reached `handle`, wrap-around aware, for at most `size`
// milliseconds (0: VATTN_WAIT_VALUE_TIMEOUT_NS); benchmarks/NOTES.md #124). WAIT_VALUE's time and
// calls are counted with WAIT_EVENT's.
//
// Background ops (vattn_mapper_submit_background) run one at a time only while no batch is
// queued, so they never delay a step's mappings by more than the one driver call in progress; a
// DRAIN op in a batch runs them first where that batch depends on them: every background op
// submitted up to its `handle`-th, in order. DRAIN_ROW (row `size`, up to the `handle`-th) runs
// only that row's among them, once vattn_mapper_set_rows has said which row an address lies in:
// ops of different rows touch different addresses (a physical page may be mapped in several
// places at once), so one row's ops need not wait for another's, and a step that admits a request
// into a warm row no longer runs every row's warming queued before it (benchmarks/NOTES.md #143:
// a 3-op batch ran 36.9 ms, its slowest op 2 ms, the rest queued work, while the GPU waited). An op of
// no row (a WAIT_EVENT, say) before the row's last makes it a DRAIN, as does a table of no rows.
//
// One thread runs the ops: splitting a batch over threads by row was tried and removed, since the
// driver serializes VMM calls (on an H200, 2-8 threads mapping at once took 0.77-0.79x the time of
// one: benchmarks/NOTES.md #43).
//
// The thread also times itself (vattn_mapper_stats): nanoseconds spent in driver calls by kind and
// in WAIT_EVENT, so that a benchmark can compare the mapping work the GPU may wait for (stream
// mode) with what the engine thread sees; and it keeps the batches that took longest from
// submission to done (vattn_mapper_slowest: queued and running time, the slowest op), which tells a
// slow driver call from a batch that waited behind another. For each kept batch it also says where
// the running time went (benchmarks/NOTES.md #141): the thread's own CPU time, its time waiting for
// a CPU on the run queue (/proc/thread-self/schedstat; -1 where the kernel does not provide it), and
// its voluntary and involuntary context switches (getrusage RUSAGE_THREAD). A driver call that spins
// shows as CPU time; one that sleeps in the kernel (a lock, an ioctl waiting for the GPU) as
// voluntary switches with little CPU; a thread starved of a core as run-queue time.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <pthread.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

extern "C" {

typedef int (*map_fn)(uint64_t va, size_t size, size_t offset, uint64_t handle, uint64_t flags);
typedef int (*unmap_fn)(uint64_t va, size_t size);
typedef int (*set_access_fn)(uint64_t va, size_t size, const void* desc, size_t count);
typedef int (*set_context_fn)(void* ctx);
typedef int (*event_sync_fn)(void* event);

struct vattn_driver_table {
  map_fn map;
  unmap_fn unmap;
  set_access_fn set_access;
  set_context_fn set_context;  // may be null (fake driver)
  void* context;
  const void* access_rw;  // CUmemAccessDesc for read-write
  const void* access_ro;  // CUmemAccessDesc for read-only
  event_sync_fn event_sync;  // may be null when no WAIT_EVENT op is ever submitted
};

enum {
  VATTN_OP_MAP = 0,
  VATTN_OP_UNMAP = 1,
  VATTN_OP_ACCESS_RW = 2,
  VATTN_OP_ACCESS_RO = 3,
  VATTN_OP_SIGNAL = 4,
  VATTN_OP_WAIT_EVENT = 5,
  VATTN_OP_DRAIN = 6,
  VATTN_OP_WAIT_VALUE = 7,
  VATTN_OP_DRAIN_ROW = 8
};
#define VATTN_NUM_KINDS 7  // the kinds with their own time and calls (WAIT_VALUE counts as WAIT_EVENT)
#define VATTN_WAIT_VALUE_TIMEOUT_NS (120ull * 1000000000ull)  // a step never takes this long
#define VATTN_ERR_WAIT_TIMEOUT (-4)

struct vattn_op {
  int32_t kind;
  int32_t pad;
  uint64_t va;
  uint64_t size;
  uint64_t handle;
};
}

namespace {

// Time and calls per op kind, added up by one thread and folded into the Mapper's totals under its
// lock once per batch (not twice per op: the engine thread's submit and poll take the same lock).
struct Acc {
  uint64_t ns[VATTN_NUM_KINDS] = {0}, calls[VATTN_NUM_KINDS] = {0};
  uint64_t slowest_ns = 0;  // the batch's slowest op (background ops a DRAIN ran included)
  int slowest_kind = -1;
  uint64_t drained = 0;  // background ops a DRAIN or DRAIN_ROW of the batch ran
};

// Where a thread's time went, read at the start and end of a batch (see the top).
struct ThreadTimes {
  uint64_t cpu_ns = 0;  // CLOCK_THREAD_CPUTIME_ID
  int64_t runq_ns = -1;  // schedstat's second field: time runnable but waiting for a CPU; -1 unknown
  int64_t voluntary = 0, involuntary = 0;  // context switches

  // `schedstat`: an fd on the calling thread's /proc/thread-self/schedstat, or -1.
  static ThreadTimes now(int schedstat) {
    ThreadTimes t;
    timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
      t.cpu_ns = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
    rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) == 0) {
      t.voluntary = ru.ru_nvcsw;
      t.involuntary = ru.ru_nivcsw;
    }
    if (schedstat >= 0) {
      char buf[96];
      ssize_t n = pread(schedstat, buf, sizeof(buf) - 1, 0);
      unsigned long long on_cpu, waiting;
      if (n > 0) {
        buf[n] = 0;
        if (std::sscanf(buf, "%llu %llu", &on_cpu, &waiting) == 2) t.runq_ns = static_cast<int64_t>(waiting);
      }
    }
    return t;
  }
};

// One of the batches that took longest from submission to done.
struct SlowBatch {
  uint64_t latency_ns, queued_ns, run_ns, slowest_ns, n_ops, index;
  int slowest_kind;
  uint64_t submitted_ns;  // now_ns() at submission: steady_clock, i.e. CLOCK_MONOTONIC on Linux
  // while it ran: the thread's CPU time, run-queue wait (-1: unknown), voluntary and involuntary switches
  uint64_t cpu_ns;
  int64_t runq_ns, voluntary, involuntary;
  uint64_t drained;  // background ops its DRAIN / DRAIN_ROW ops ran
};
constexpr int kSlowest = 8;
constexpr int kSlowRow = 13;  // values per batch in vattn_mapper_slowest's rows

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch()).count());
}

// WAIT_VALUE: until the host word at `addr` has reached `target` (32-bit sequence numbers: reached
// when word - target, taken as signed, is >= 0). Spins briefly (a step in flight usually ends within
// microseconds of the wait's start or after milliseconds), then sleeps 20 us between looks. No
// driver call, so no driver lock: a cuEventSynchronize here once returned >= 33 ms after its event
// had completed while the engine thread waited on the GPU (NOTES #124). Gives up after
// `timeout_ns` (a GPU that never writes the word) with VATTN_ERR_WAIT_TIMEOUT.
uint64_t timeout_ns(const vattn_op& op) {  // WAIT_VALUE's limit: `size` ms, or the default
  return op.size ? op.size * 1000000ull : VATTN_WAIT_VALUE_TIMEOUT_NS;
}

int wait_value(uint64_t addr, uint32_t target, uint64_t timeout_ns) {
  const uint32_t* word = reinterpret_cast<const uint32_t*>(addr);
  auto reached = [&] { return static_cast<int32_t>(__atomic_load_n(word, __ATOMIC_ACQUIRE) - target) >= 0; };
  for (int i = 0; i < 2000; ++i) {
    if (reached()) return 0;
  }
  uint64_t t0 = now_ns();
  while (!reached()) {
    if (now_ns() - t0 > timeout_ns) return VATTN_ERR_WAIT_TIMEOUT;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return 0;
}

struct Mapper {
  vattn_driver_table table;
  std::mutex mu;
  std::condition_variable work_cv, idle_cv;
  std::deque<std::vector<vattn_op>> queue;
  std::deque<uint64_t> queued_at;  // now_ns() at each queued batch's submission (under mu)
  std::vector<SlowBatch> slowest;  // at most kSlowest, longest latency first (under mu)
  uint64_t batches = 0;  // batches run so far (under mu; a SlowBatch's index)
  // A queued background op: its number among all submitted (1, 2, ...: what DRAIN's handle counts)
  // and its row (-1: none known); `done` once a DRAIN_ROW ran it out of order (then skipped).
  struct BgOp {
    vattn_op op;
    uint64_t seq;
    int64_t row;
    bool done;
  };
  std::deque<BgOp> background;  // (under mu) in submission order; done ones dropped from the front
  uint64_t bg_submitted = 0;  // (under mu)
  // vattn_mapper_set_rows: `regions` regions of `rows_region` bytes follow rows_base, each of num_rows
  // rows of row_bytes; row of an address = ((va - rows_base) % rows_region) / row_bytes
  uint64_t rows_base = 0, regions = 0, rows_region = 0, row_bytes = 0, num_rows = 0;
  bool busy = false, stop = false;
  int error = 0;
  std::atomic<int> failed{0};  // = error, read without the lock (per op, and by poll's fast path)
  char error_text[256] = {0};
  bool worker_waiting = false;  // under mu: the worker sleeps on work_cv (a submission must wake it)
  // under mu: vattn_mapper_hold_background; background ops then run only in a DRAIN / DRAIN_ROW or
  // while a caller waits in vattn_mapper_wait (tests: every op a step needs must come from a drain)
  bool hold = false;
  int idle_waiters = 0;  // under mu: callers in vattn_mapper_wait
  uint64_t ops_done = 0;
  // per op kind (index = kind, VATTN_OP_WAIT_EVENT included): time spent and calls; under mu
  uint64_t kind_ns[VATTN_NUM_KINDS] = {0}, kind_calls[VATTN_NUM_KINDS] = {0};
  std::thread worker;

  explicit Mapper(const vattn_driver_table& t) : table(t) { worker = std::thread([this] { run(); }); }

  // Keeps the first failure (under mu) until a caller has seen it.
  void record_error_locked(int rc) {
    error = rc;
    failed.store(rc, std::memory_order_release);
  }

  void keep_if_slow(const SlowBatch& b) {  // under mu
    size_t at = 0;
    while (at < slowest.size() && slowest[at].latency_ns >= b.latency_ns) ++at;
    if (at >= static_cast<size_t>(kSlowest)) return;
    slowest.insert(slowest.begin() + at, b);
    if (slowest.size() > static_cast<size_t>(kSlowest)) slowest.pop_back();
  }

  void fold(Acc& acc) {  // under mu
    for (int k = 0; k < VATTN_NUM_KINDS; ++k) {
      kind_ns[k] += acc.ns[k];
      kind_calls[k] += acc.calls[k];
    }
    acc = Acc();
  }

  void set_context_or_fail(const char* who) {
    if (!table.set_context) return;
    int rc = table.set_context(table.context);
    if (rc) {
      std::lock_guard<std::mutex> g(mu);
      if (error == 0) {
        record_error_locked(rc);
        std::snprintf(error_text, sizeof(error_text), "cuCtxSetCurrent on the %s returned %d", who, rc);
      }
    }
  }

  int execute(const vattn_op& op) {
    switch (op.kind) {
      case VATTN_OP_MAP: return table.map(op.va, op.size, 0, op.handle, 0);
      case VATTN_OP_UNMAP: return table.unmap(op.va, op.size);
      case VATTN_OP_ACCESS_RW: return table.set_access(op.va, op.size, table.access_rw, 1);
      case VATTN_OP_ACCESS_RO: return table.set_access(op.va, op.size, table.access_ro, 1);
      case VATTN_OP_WAIT_EVENT:
        return table.event_sync ? table.event_sync(reinterpret_cast<void*>(op.handle)) : -3;
      case VATTN_OP_SIGNAL:
        __atomic_store_n(reinterpret_cast<uint32_t*>(op.va), static_cast<uint32_t>(op.handle), __ATOMIC_RELEASE);
        return 0;
      case VATTN_OP_WAIT_VALUE:
        return wait_value(op.va, static_cast<uint32_t>(op.handle), timeout_ns(op));
      default: return -1;
    }
  }

  // Runs one op, timed into `acc`; a failure is kept, and later driver calls are dropped until it
  // is seen (signals still run).
  void run_op(const vattn_op& op, Acc& acc) {
    if (op.kind == VATTN_OP_DRAIN) {
      drain(op.handle, acc);
      return;
    }
    if (op.kind == VATTN_OP_DRAIN_ROW) {
      drain_row(static_cast<int64_t>(op.size), op.handle, acc);
      return;
    }
    if (failed.load(std::memory_order_acquire) != 0 && op.kind != VATTN_OP_SIGNAL) return;
    auto t0 = std::chrono::steady_clock::now();
    int rc = execute(op);
    uint64_t ns = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
    int counted = op.kind == VATTN_OP_WAIT_VALUE ? static_cast<int>(VATTN_OP_WAIT_EVENT) : op.kind;
    if (counted >= 0 && counted < VATTN_NUM_KINDS) {
      acc.ns[counted] += ns;
      acc.calls[counted] += 1;
    }
    if (ns > acc.slowest_ns) {
      acc.slowest_ns = ns;
      acc.slowest_kind = op.kind;
    }
    if (rc) {
      std::lock_guard<std::mutex> g(mu);
      if (error == 0) {
        record_error_locked(rc);
        if (op.kind == VATTN_OP_WAIT_VALUE && rc == VATTN_ERR_WAIT_TIMEOUT)
          std::snprintf(error_text, sizeof(error_text),
                        "WAIT_VALUE: the GPU did not write step %llu into the host word at 0x%llx within %llu ms "
                        "(it holds %u); a step that never finished, or a failed stream",
                        (unsigned long long)op.handle, (unsigned long long)op.va,
                        (unsigned long long)(timeout_ns(op) / 1000000ull),
                        __atomic_load_n(reinterpret_cast<const uint32_t*>(op.va), __ATOMIC_ACQUIRE));
        else
          std::snprintf(error_text, sizeof(error_text), "op kind %d at va=0x%llx size=%llu returned %d",
                        op.kind, (unsigned long long)op.va, (unsigned long long)op.size, rc);
      }
    }
  }

  // The row `va` lies in, -1 for none (no rows set, or outside them). Under mu.
  int64_t row_of(uint64_t va) const {
    if (!row_bytes || va < rows_base) return -1;
    uint64_t off = va - rows_base;
    if (off / rows_region >= regions) return -1;
    uint64_t row = (off % rows_region) / row_bytes;
    return row < num_rows ? static_cast<int64_t>(row) : -1;
  }

  bool background_runnable() const {  // under mu: idle time may go to background ops
    return !background.empty() && (!hold || idle_waiters > 0);
  }

  void drop_done_front() {  // under mu
    while (!background.empty() && background.front().done) background.pop_front();
  }

  // Pops and runs the next background op (numbered at most `upto`); false when there is none.
  bool run_one_background(Acc& acc, uint64_t upto = UINT64_MAX) {
    vattn_op op;
    {
      std::lock_guard<std::mutex> g(mu);
      drop_done_front();
      if (background.empty() || background.front().seq > upto) return false;
      op = background.front().op;
      background.pop_front();
    }
    run_op(op, acc);
    return true;
  }

  // Runs background ops in order until every one numbered up to `target` has run.
  void drain(uint64_t target, Acc& acc) {
    while (run_one_background(acc, target)) ++acc.drained;
  }

  // Runs `row`'s background ops numbered up to `target`, in order, and no other row's; any op of no
  // row among those up to the last of them makes it a drain(target).
  void drain_row(int64_t row, uint64_t target, Acc& acc) {
    std::vector<vattn_op> mine;
    {
      std::lock_guard<std::mutex> g(mu);
      drop_done_front();
      size_t last = 0, n = 0, barrier = SIZE_MAX;  // barrier: the first op of no row
      for (size_t i = 0; i < background.size() && background[i].seq <= target; ++i) {
        const BgOp& b = background[i];
        if (b.done) continue;
        if (b.row < 0 && barrier == SIZE_MAX) barrier = i;
        if (b.row == row) last = i + 1, ++n;
      }
      if (n && barrier >= last) {
        mine.reserve(n);
        for (size_t i = 0; i < last; ++i) {
          BgOp& b = background[i];
          if (!b.done && b.row == row) {
            mine.push_back(b.op);
            b.done = true;
          }
        }
        drop_done_front();
      } else if (!n) {
        return;  // nothing of the row's is queued: nothing to wait for
      }
    }
    if (mine.empty()) {  // an op of no row before the row's last: the queue's order up to there
      drain(target, acc);
      return;
    }
    for (const vattn_op& op : mine) run_op(op, acc);
    acc.drained += mine.size();
  }

  void run() {
    // named for top, /proc/<pid>/task/*/comm and the suite's CPU table (bench/procstat.py)
    pthread_setname_np(pthread_self(), "vattn-mapper");
    set_context_or_fail("mapping thread");
    int schedstat = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);  // -1: runq_ns unknown
    struct CloseFd {
      int fd;
      ~CloseFd() {
        if (fd >= 0) close(fd);
      }
    } closer{schedstat};
    for (;;) {
      std::vector<vattn_op> batch;
      Acc acc;
      uint64_t submitted_ns = 0;
      {
        std::unique_lock<std::mutex> lk(mu);
        worker_waiting = true;
        work_cv.wait(lk, [this] { return stop || !queue.empty() || background_runnable(); });
        worker_waiting = false;
        if (queue.empty() && (stop || !background_runnable())) {
          if (stop) return;
          continue;
        }
        busy = true;
        if (!queue.empty()) {
          batch = std::move(queue.front());
          queue.pop_front();
          submitted_ns = queued_at.front();
          queued_at.pop_front();
        }
      }
      ThreadTimes before;
      if (!batch.empty()) before = ThreadTimes::now(schedstat);
      uint64_t start_ns = now_ns();
      if (batch.empty()) {
        run_one_background(acc);  // nothing urgent: one background op, then look again
      } else {
        for (const vattn_op& op : batch) run_op(op, acc);
      }
      uint64_t end_ns = now_ns();
      ThreadTimes after;
      if (!batch.empty()) after = ThreadTimes::now(schedstat);
      bool notify;
      {
        std::lock_guard<std::mutex> g(mu);
        if (!batch.empty())
          keep_if_slow({end_ns - submitted_ns, start_ns - submitted_ns, end_ns - start_ns, acc.slowest_ns,
                        batch.size(), batches++, acc.slowest_kind, submitted_ns, after.cpu_ns - before.cpu_ns,
                        (before.runq_ns < 0 || after.runq_ns < 0) ? -1 : after.runq_ns - before.runq_ns,
                        after.voluntary - before.voluntary, after.involuntary - before.involuntary, acc.drained});
        fold(acc);
        ops_done += batch.size();
        busy = false;
        notify = idle_waiters > 0;
      }
      if (notify) idle_cv.notify_all();
    }
  }
};

}  // namespace

extern "C" {

void* vattn_mapper_create(const vattn_driver_table* table) {
  if (!table || !table->map || !table->unmap || !table->set_access) return nullptr;
  try {
    return new Mapper(*table);  // starts the worker thread
  } catch (...) {  // out of memory or no thread: the caller gets null, never an exception across the C ABI
    return nullptr;
  }
}

int vattn_mapper_submit(void* handle, const vattn_op* ops, uint64_t n) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  std::vector<vattn_op> batch(ops, ops + n);  // copied outside the lock the worker takes per batch
  bool wake;
  {
    std::lock_guard<std::mutex> g(m->mu);
    if (m->stop) return -2;
    m->queue.push_back(std::move(batch));
    m->queued_at.push_back(now_ns());
    wake = m->worker_waiting;
  }
  if (wake) m->work_cv.notify_one();  // a busy worker looks at the queue before it sleeps again
  return 0;
}

// Queues ops to run while no batch is waiting (see the top). Returns 0, or -2 once stopped.
int vattn_mapper_submit_background(void* handle, const vattn_op* ops, uint64_t n) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  bool wake;
  {
    std::lock_guard<std::mutex> g(m->mu);
    if (m->stop) return -2;
    for (uint64_t i = 0; i < n; ++i) {
      bool addressed = ops[i].kind <= VATTN_OP_ACCESS_RO;  // MAP, UNMAP, ACCESS_RW/RO: `va` is a row's
      m->background.push_back({ops[i], ++m->bg_submitted, addressed ? m->row_of(ops[i].va) : -1, false});
    }
    wake = m->worker_waiting;
  }
  if (wake) m->work_cv.notify_one();
  return 0;
}

// Tests: with `on`, background ops run only where a DRAIN or DRAIN_ROW asks for them or while a
// caller waits in vattn_mapper_wait, not in idle time, so a step that needs an op no drain ran
// finds it missing instead of finding it run by chance. Returns 0, -1 on a bad handle.
int vattn_mapper_hold_background(void* handle, int on) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  bool wake;
  {
    std::lock_guard<std::mutex> g(m->mu);
    m->hold = on != 0;
    wake = !m->hold && m->worker_waiting;
  }
  if (wake) m->work_cv.notify_one();
  return 0;
}

// Which row an address lies in, for DRAIN_ROW: `regions` regions of `region_bytes` follow `base`
// (one for a layout whose rows are contiguous; one per layer and K/V for one that splits them), each
// made of `rows` rows of `row_bytes`. Ops submitted to the background before this call keep no row
// (a DRAIN_ROW among them acts as a DRAIN). Returns 0, -1 on bad arguments.
int vattn_mapper_set_rows(void* handle, uint64_t base, uint64_t regions, uint64_t region_bytes, uint64_t row_bytes,
                          uint64_t rows) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m || !regions || !row_bytes || !rows || region_bytes < row_bytes * rows) return -1;
  std::lock_guard<std::mutex> g(m->mu);
  m->rows_base = base;
  m->regions = regions;
  m->rows_region = region_bytes;
  m->row_bytes = row_bytes;
  m->num_rows = rows;
  return 0;
}

// Blocks until every submitted op, background ones included, has run. Returns 0 or the first
// error (then clears it).
int vattn_mapper_wait(void* handle, char* text, uint64_t text_len, uint64_t* ops_done) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  std::unique_lock<std::mutex> lk(m->mu);
  ++m->idle_waiters;
  if (m->hold && m->worker_waiting) m->work_cv.notify_one();  // held background ops run now
  m->idle_cv.wait(lk, [m] { return m->queue.empty() && m->background.empty() && !m->busy; });
  --m->idle_waiters;
  int rc = m->error;
  if (text && text_len) {
    std::strncpy(text, m->error_text, text_len - 1);
    text[text_len - 1] = 0;
  }
  if (ops_done) *ops_done = m->ops_done;
  m->error = 0;
  m->failed.store(0, std::memory_order_release);
  m->error_text[0] = 0;
  return rc;
}

// Does not block: returns the first error so far (then clears it, and fills `text`), 0 if none.
int vattn_mapper_poll(void* handle, char* text, uint64_t text_len) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  if (m->failed.load(std::memory_order_acquire) == 0) return 0;  // the usual case: no lock (`text` untouched)
  std::lock_guard<std::mutex> g(m->mu);
  int rc = m->error;
  if (text && text_len) {
    std::strncpy(text, m->error_text, text_len - 1);
    text[text_len - 1] = 0;
  }
  m->error = 0;
  m->failed.store(0, std::memory_order_release);
  m->error_text[0] = 0;
  return rc;
}

// Copies the per-kind counters into ns[7] and calls[7] (index = op kind); reset != 0 zeroes them.
int vattn_mapper_stats(void* handle, uint64_t* ns, uint64_t* calls, int reset) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m || !ns || !calls) return -1;
  std::lock_guard<std::mutex> g(m->mu);
  for (int k = 0; k < VATTN_NUM_KINDS; ++k) {
    ns[k] = m->kind_ns[k];
    calls[k] = m->kind_calls[k];
    if (reset) m->kind_ns[k] = m->kind_calls[k] = 0;
  }
  return 0;
}

// The batches that took longest from submission to done, longest first: up to `max` rows of 13
// values (latency, queued, running and slowest-op milliseconds, the slowest op's kind, the batch's
// ops, its index among the batches run, its submission in seconds of CLOCK_MONOTONIC; while it ran:
// the thread's CPU ms, its ms waiting for a CPU (-1: unknown), its voluntary and involuntary context
// switches; the background ops its DRAIN / DRAIN_ROW ops ran). Returns the rows written, -1 on bad arguments; `reset` forgets them (and restarts the index).
int vattn_mapper_slowest(void* handle, double* out, int max, int reset) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m || (!out && max > 0) || max < 0) return -1;
  std::lock_guard<std::mutex> g(m->mu);
  int n = 0;
  for (const SlowBatch& b : m->slowest) {
    if (n >= max) break;
    double* row = out + kSlowRow * n++;
    row[0] = b.latency_ns / 1e6;
    row[1] = b.queued_ns / 1e6;
    row[2] = b.run_ns / 1e6;
    row[3] = b.slowest_ns / 1e6;
    row[4] = b.slowest_kind;
    row[5] = static_cast<double>(b.n_ops);
    row[6] = static_cast<double>(b.index);
    row[7] = b.submitted_ns / 1e9;  // seconds of CLOCK_MONOTONIC: Python's time.perf_counter on Linux
    row[8] = b.cpu_ns / 1e6;
    row[9] = b.runq_ns < 0 ? -1.0 : b.runq_ns / 1e6;
    row[10] = static_cast<double>(b.voluntary);
    row[11] = static_cast<double>(b.involuntary);
    row[12] = static_cast<double>(b.drained);
  }
  if (reset) {
    m->slowest.clear();
    m->batches = 0;
  }
  return n;
}

// A driver table whose calls do nothing and succeed: for measuring what the engine thread spends
// handing ops to the native thread (benchmarks/cpu_sched_overhead.py --native), without a GPU.
static int null_map(uint64_t, size_t, size_t, uint64_t, uint64_t) { return 0; }
static int null_unmap(uint64_t, size_t) { return 0; }
static int null_access(uint64_t, size_t, const void*, size_t) { return 0; }
static int null_event(void*) { return 0; }
static const int null_desc = 0;

void vattn_null_driver_table(vattn_driver_table* t) {
  if (!t) return;
  t->map = null_map;
  t->unmap = null_unmap;
  t->set_access = null_access;
  t->set_context = nullptr;
  t->context = nullptr;
  t->access_rw = &null_desc;
  t->access_ro = &null_desc;
  t->event_sync = null_event;
}

void vattn_mapper_destroy(void* handle) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return;
  {
    std::lock_guard<std::mutex> g(m->mu);
    m->stop = true;
  }
  m->work_cv.notify_all();
  if (m->worker.joinable()) m->worker.join();
  delete m;
}
}
