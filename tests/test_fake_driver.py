import pytest

from vllm_vattention.errors import OutOfAddressSpaceError, OutOfPagesError
from vllm_vattention.memory import FakeDriver, FakeDriverError

G = 4096


def test_map_read_write_alias():
    d = FakeDriver(G)
    va = d.reserve(4 * G)
    h = d.create(G)
    d.map(va, G, h)
    d.map(va + 2 * G, G, h)  # one page at two addresses
    d.set_access(va, G)
    d.set_access(va + 2 * G, G)
    d.write(va + 10, b"hello")
    assert d.read(va + 2 * G + 10, 5) == b"hello"


@pytest.mark.parametrize("misuse, match", [
    (lambda d, va, h: (d.map(va, G, h), d.map(va, G, h)), "double map"),
    (lambda d, va, h: d.unmap(va, G), "unmap of unmapped"),
    (lambda d, va, h: (d.release(h), d.map(va, G, h)), "released"),
    (lambda d, va, h: (d.map(va, G, h), d.release(h)), "released while mapped"),
    (lambda d, va, h: (d.map(va, G, h), d.read(va, 1)), "illegal read"),
    (lambda d, va, h: (d.map(va, G, h), d.set_access(va, G, writable=False), d.write(va, b"x")), "illegal write"),
    (lambda d, va, h: d.map(va + 1, G, h), "granularity"),
    (lambda d, va, h: d.map(va + 8 * G, G, h), "reservation"),
    (lambda d, va, h: d.map(va, 2 * G, h), "map it whole"),
    (lambda d, va, h: d.map(va, G, h, offset=G), "offset 0"),
    (lambda d, va, h: (d.map(va, G, h), d.free_reservation(va, 4 * G)), "still mapped"),
])
def test_misuse_is_detected(misuse, match):
    d = FakeDriver(G)
    va, h = d.reserve(4 * G), d.create(G)
    with pytest.raises(FakeDriverError, match=match):
        misuse(d, va, h)


def test_leaks_are_listed_and_clean_teardown_has_none():
    d = FakeDriver(G)
    va, h = d.reserve(2 * G), d.create(G)
    d.map(va, G, h)
    assert len(d.leaks()) == 3
    d.unmap(va, G)
    d.release(h)
    d.free_reservation(va, 2 * G)
    assert d.leaks() == []


def test_capacity_and_va_limits_raise_typed_errors():
    d = FakeDriver(G, capacity=2 * G, va_limit=(1 << 32) + 8 * G)
    d.create(2 * G)
    with pytest.raises(OutOfPagesError):
        d.create(G)
    with pytest.raises(OutOfAddressSpaceError):
        d.reserve(16 * G)


def test_the_fake_and_the_cuda_driver_both_have_every_method_of_the_driver_interface():
    """memory.driver.Driver is what the manager calls: the fake must offer it for the CPU tests to
    mean anything, and libcuda's driver for the GPU (VATTN_FENCE=value's stream_write was once
    written into the Protocol instead of CudaDriver: it would have failed only on a GPU)."""
    import inspect

    from vllm_vattention.memory.driver import CudaDriver, Driver
    from vllm_vattention.memory.fake_driver import FakeDriver
    wanted = {n for n, v in vars(Driver).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert {"map", "unmap", "stream_wait", "stream_write", "host_flag"} <= wanted
    for cls in (CudaDriver, FakeDriver):
        missing = {n for n in wanted if not inspect.isfunction(getattr(cls, n, None))}
        assert not missing, (cls.__name__, missing)
