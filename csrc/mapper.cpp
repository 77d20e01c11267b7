// A native thread that runs lists of CUDA VMM calls (map, set access, unmap) without the GIL.
//
// Loaded with ctypes (vllm_vattention/memory/native.py); plain C ABI, no Python headers. The
// driver entry points come in a table, so CPU tests pass the fake driver's functions and the GPU
// path passes libcuda's. Errors never abort: the first failing call's CUresult and a description
// are kept and returned by vattn_mapper_wait, and the operations queued after it are dropped.
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

extern "C" {

typedef int (*map_fn)(uint64_t va, size_t size, size_t offset, uint64_t handle, uint64_t flags);
typedef int (*unmap_fn)(uint64_t va, size_t size);
typedef int (*set_access_fn)(uint64_t va, size_t size, const void* desc, size_t count);
typedef int (*set_context_fn)(void* ctx);

struct vattn_driver_table {
  map_fn map;
  unmap_fn unmap;
  set_access_fn set_access;
  set_context_fn set_context;  // may be null (fake driver)
  void* context;
  const void* access_rw;  // CUmemAccessDesc for read-write
  const void* access_ro;  // CUmemAccessDesc for read-only
};

enum { VATTN_OP_MAP = 0, VATTN_OP_UNMAP = 1, VATTN_OP_ACCESS_RW = 2, VATTN_OP_ACCESS_RO = 3 };

struct vattn_op {
  int32_t kind;
  int32_t pad;
  uint64_t va;
  uint64_t size;
  uint64_t handle;
};
}

namespace {

struct Mapper {
  vattn_driver_table table;
  std::mutex mu;
  std::condition_variable work_cv, idle_cv;
  std::deque<std::vector<vattn_op>> queue;
  bool busy = false, stop = false;
  int error = 0;
  char error_text[256] = {0};
  uint64_t ops_done = 0;
  std::thread worker;

  explicit Mapper(const vattn_driver_table& t) : table(t) { worker = std::thread([this] { run(); }); }

  int execute(const vattn_op& op) {
    switch (op.kind) {
      case VATTN_OP_MAP: return table.map(op.va, op.size, 0, op.handle, 0);
      case VATTN_OP_UNMAP: return table.unmap(op.va, op.size);
      case VATTN_OP_ACCESS_RW: return table.set_access(op.va, op.size, table.access_rw, 1);
      case VATTN_OP_ACCESS_RO: return table.set_access(op.va, op.size, table.access_ro, 1);
      default: return -1;
    }
  }

  void run() {
    if (table.set_context) {
      int rc = table.set_context(table.context);
      if (rc) {
        std::lock_guard<std::mutex> g(mu);
        error = rc;
        std::snprintf(error_text, sizeof(error_text), "cuCtxSetCurrent on the mapping thread returned %d", rc);
      }
    }
    for (;;) {
      std::vector<vattn_op> batch;
      {
        std::unique_lock<std::mutex> lk(mu);
        work_cv.wait(lk, [this] { return stop || !queue.empty(); });
        if (queue.empty() && stop) return;
        batch = std::move(queue.front());
        queue.pop_front();
        busy = true;
        if (error) batch.clear();  // after a failure, drop work until the caller sees the error
      }
      for (const vattn_op& op : batch) {
        int rc = execute(op);
        if (rc) {
          std::lock_guard<std::mutex> g(mu);
          error = rc;
          std::snprintf(error_text, sizeof(error_text), "op kind %d at va=0x%llx size=%llu returned %d",
                        op.kind, (unsigned long long)op.va, (unsigned long long)op.size, rc);
          break;
        }
      }
      {
        std::lock_guard<std::mutex> g(mu);
        ops_done += batch.size();
        busy = false;
      }
      idle_cv.notify_all();
    }
  }
};

}  // namespace

extern "C" {

void* vattn_mapper_create(const vattn_driver_table* table) {
  if (!table || !table->map || !table->unmap || !table->set_access) return nullptr;
  return new (std::nothrow) Mapper(*table);
}

int vattn_mapper_submit(void* handle, const vattn_op* ops, uint64_t n) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  {
    std::lock_guard<std::mutex> g(m->mu);
    if (m->stop) return -2;
    m->queue.emplace_back(ops, ops + n);
  }
  m->work_cv.notify_one();
  return 0;
}

// Blocks until every submitted op has run. Returns 0 or the first error (then clears it).
int vattn_mapper_wait(void* handle, char* text, uint64_t text_len, uint64_t* ops_done) {
  auto* m = static_cast<Mapper*>(handle);
  if (!m) return -1;
  std::unique_lock<std::mutex> lk(m->mu);
  m->idle_cv.wait(lk, [m] { return m->queue.empty() && !m->busy; });
  int rc = m->error;
  if (text && text_len) {
    std::strncpy(text, m->error_text, text_len - 1);
    text[text_len - 1] = 0;
  }
  if (ops_done) *ops_done = m->ops_done;
  m->error = 0;
  m->error_text[0] = 0;
  return rc;
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
