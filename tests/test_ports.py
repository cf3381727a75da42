import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from distrib import LaunchError
from distrib._store import host_store
from distrib.ports import (PORT_RANGE, AddressInUse, bind_first_free, candidate_ports,
                           port_for_launch_id)


def test_port_is_a_stable_hash_in_range():
    assert port_for_launch_id("job-1") == port_for_launch_id("job-1")
    ports = {port_for_launch_id(f"job-{i}") for i in range(200)}
    assert len(ports) > 150  # spread, not a constant
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)


def test_candidates_start_at_the_hash_and_wrap_in_range():
    ports = list(candidate_ports("x", attempts=5))
    assert ports[0] == port_for_launch_id("x") and len(set(ports)) == 5
    small = list(candidate_ports("x", attempts=10, port_range=(1000, 1004)))
    assert sorted(small) == [1000, 1001, 1002, 1003]


def test_bind_first_free_moves_past_taken_ports():
    taken = set(list(candidate_ports("y", attempts=3)))

    def bind(port):
        if port in taken:
            raise AddressInUse(port)
        return port

    assert bind_first_free("y", bind) not in taken
    with pytest.raises(LaunchError, match="no free rendezvous port"):
        bind_first_free("y", lambda p: (_ for _ in ()).throw(AddressInUse(p)), attempts=4)


def test_host_store_skips_a_port_someone_else_holds():
    first = port_for_launch_id("held")
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", first))
        except OSError:
            pytest.skip("the hashed port is already in use on this machine")
        s.listen()
        store, port = host_store("held", 1)
        assert port != first
        del store


def test_concurrent_stores_with_the_same_launch_id_get_distinct_ports():
    """The probe is the bind: no two racing hosts can end up on one port."""
    results, errors = [], []

    def host():
        try:
            results.append(host_store("same-id", 1))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=host) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({port for _, port in results}) == 3


def test_three_launches_started_together_all_succeed(tmp_path):
    """Three launches at the same moment, all hashing to the same first port."""
    script = tmp_path / "one_launch.py"
    script.write_text(textwrap.dedent("""
        import sys
        import distrib
        from workers import rank_times

        if __name__ == "__main__":
            # The same launch id for all three forces their port probes to collide.
            results = distrib.launch(rank_times, nprocs=2, args=(int(sys.argv[1]),),
                                     launch_id="clash", start_method="forkserver", timeout=120)
            print(results)
    """))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    procs = [subprocess.Popen([sys.executable, str(script), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for k in (1, 2, 3)]
    outs = [p.communicate(timeout=180) for p in procs]
    for k, (p, (out, err)) in zip((1, 2, 3), zip(procs, outs)):
        assert p.returncode == 0, err
        assert out.strip() == str([0, k])
