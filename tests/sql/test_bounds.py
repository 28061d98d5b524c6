"""The sandbox's time and memory bounds hold from the first byte (issue 11).

Each blow-up runs in a fresh Python subprocess (under an address-space cap,
so that a regression cannot take the machine down) that reports its wall
time, its own peak RSS and the peak RSS of its reaped children (the worker
processes). The numbers asserted here are the ones ``docs/sql.md`` states.
"""

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxsql.sql import execute

from .test_pool import cte_bomb

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
#: The test process itself: interpreter, jaxsql.sql and its results, never a query's work.
SELF_BOUND_MB = 150
#: Slack over a worker's budget for what RLIMIT_DATA does not count (code, the database's memory map).
RSS_SLACK_MB = 64

HARNESS = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from jaxsql.sql import execute, SqlPool

def children(pid):
    out = []
    for task in os.listdir(f"/proc/{{pid}}/task"):
        try:
            with open(f"/proc/{{pid}}/task/{{task}}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out

def tree_cpu_s():
    total = 0.0
    for pid in [os.getpid()] + children(os.getpid()):
        try:
            with open(f"/proc/{{pid}}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total

def written(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{{pid}}/io") as f:
                total += int(dict(l.split(": ") for l in f.read().splitlines())["wchar"])
        except OSError:
            pass
    return total

def pids(pool=None):
    return [os.getpid()] + (pool.worker_pids() if hasattr(pool, "worker_pids") else [])

out = {{}}
DB, SQL = {db!r}, {sql!r}
{body}
try:
    from jaxsql.sql.worker import close_shared_workers
    close_shared_workers()
except ImportError:
    pass
# VmHWM, not ru_maxrss: Linux carries the peak of the (forking) parent across exec into ru_maxrss
with open("/proc/self/status") as f:
    out["self_peak_mb"] = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
# the workers were spawned by this small process, so their ru_maxrss is their own
out["children_peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
"""


def measure(db: Path, sql: str, body: str, timeout: float = 120) -> dict:
    """Run `body` in a fresh interpreter (``DB``, ``SQL``, ``out`` and the helpers above in scope)."""
    code = HARNESS.format(root=str(REPO), db=str(db), sql=sql, body=textwrap.dedent(body))

    def cap() -> None:  # protects the machine if the bound regresses
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=cap)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- 1. time before the first VM instruction ----------------------------------------------------

def test_preparation_blowup_stopped_at_deadline_and_nothing_left_running(tiny_db):
    """Nested NOT MATERIALIZED CTEs (1.4 KB): SQLite prepares for 9 s / 670 MB without stopping."""
    out = measure(tiny_db, cte_bomb(18), """
        execute(DB, "SELECT 1")  # a started worker: the bound is on the query, not on booting Python
        t = time.perf_counter()
        r = execute(DB, SQL, timeout_s=1.0)
        out["execute"] = [r.error, r.limit, time.perf_counter() - t]
        c = tree_cpu_s(); time.sleep(1.0); out["execute_cpu_after"] = tree_cpu_s() - c
        with SqlPool(2, timeout_s=1.0) as pool:
            pool.execute_batch([(DB, "SELECT 1"), (DB, "SELECT 2")])
            t = time.perf_counter()
            r = pool.execute_batch([(DB, SQL)])[0]
            out["pool"] = [r.error, r.limit, time.perf_counter() - t]
            c = tree_cpu_s(); time.sleep(1.0); out["pool_cpu_after"] = tree_cpu_s() - c
    """)
    for key in ("execute", "pool"):
        error, limit, wall = out[key]
        # the deadline ends it; on a loaded machine the memory budget may come first (either
        # bound stops it, which is what this test is about)
        assert (error, limit) in {("timeout", "deadline"), ("too_large", "memory")}, out
        assert wall < 1.0 + 0.3 + 0.4, out  # deadline + KILL_GRACE_S + the kill itself, under load
        # nothing of the query runs after its answer: the process tree is idle
        assert out[f"{key}_cpu_after"] < 0.2, out
    assert out["self_peak_mb"] < SELF_BOUND_MB, out
    assert out["children_peak_mb"] < 512 + RSS_SLACK_MB, out


def test_memory_budget_stops_what_the_deadline_would_not(tiny_db):
    """A longer bomb with a generous deadline ends at the worker's memory budget, not after minutes."""
    out = measure(tiny_db, cte_bomb(24), """
        t = time.perf_counter()
        r = execute(DB, SQL, timeout_s=60.0, max_memory=256 << 20)
        out["execute"] = [r.error, r.limit, time.perf_counter() - t]
    """)
    error, limit, wall = out["execute"]
    assert (error, limit) == ("too_large", "memory"), out
    assert wall < 30, out
    assert out["children_peak_mb"] < 256 + RSS_SLACK_MB, out
    assert out["self_peak_mb"] < SELF_BOUND_MB, out


def test_temporary_storage_stays_in_memory(tiny_db):
    """A sort of 9 million rows spilled to temp files: ~1 GB written in 5 s. Now nothing is written."""
    sql = "SELECT a.x, b.x FROM big a, big b ORDER BY a.x * 7 + b.x * 13 LIMIT 1 OFFSET 8000000"
    out = measure(tiny_db, sql, """
        with SqlPool(1, timeout_s=3.0) as pool:
            pool.execute_batch([(DB, "SELECT 1")])
            before = written(pids(pool))
            r = pool.execute_batch([(DB, SQL)])[0]
            out["written"] = written(pids(pool)) - before
            out["result"] = [r.error, r.limit]
    """)
    assert out["result"][0] in ("timeout", "too_large"), out
    assert out["written"] < 1 * MiB, out  # a reply on the pipe, no temp file
    assert out["children_peak_mb"] < 512 + RSS_SLACK_MB, out


# -- 2. memory counted before it is spent --------------------------------------------------------

def test_wide_refused_result_stays_under_stated_bound(tiny_db):
    """80 columns of 200 KB text per row: refused at max_bytes, holding at most one more value.

    The old fetch loop counted bytes every 64 rows: 64 x 16 MB = 1 GB before refusing.
    """
    cols = ", ".join(f"v AS c{i}" for i in range(80))
    sql = f"WITH s(v) AS (SELECT printf('%.200000c', 'x')) SELECT {cols} FROM s, big LIMIT 200"
    out = measure(tiny_db, sql, """
        r = execute(DB, SQL, timeout_s=30.0)
        out["result"] = [r.error, r.limit]
    """)
    assert out["result"] == ["too_large", "bytes"], out
    # stated bound: max_bytes (64 MiB) of values + one value + the worker's own ~40 MiB
    assert out["children_peak_mb"] < 64 + 100, out
    assert out["self_peak_mb"] < SELF_BOUND_MB, out


def test_wide_blob_row_stays_within_memory_budget(tiny_db):
    """2,000 BLOB columns of 200 KB in one row (400 MB): BLOBs are counted per row, the budget bounds the row."""
    cols = ", ".join(["v"] * 2000)
    sql = f"WITH s(v) AS (SELECT randomblob(200000)) SELECT {cols} FROM s"
    out = measure(tiny_db, sql, """
        r = execute(DB, SQL, timeout_s=30.0, max_memory=256 << 20)
        out["result"] = [r.error, r.limit]
    """)
    assert out["result"][0] == "too_large", out
    assert out["children_peak_mb"] < 256 + RSS_SLACK_MB, out
    assert out["self_peak_mb"] < SELF_BOUND_MB, out


# -- 3. type-robust function guards --------------------------------------------------------------

TYPE_BYPASSES = [
    "SELECT printf('%*c', '1000000000', 'x')",  # width as text
    "SELECT printf(CAST('%.1000000000c' AS BLOB), 'x')",  # format as a BLOB
    "SELECT format('%.*c', '1e9', 'x')",  # precision as text in scientific notation
    "SELECT printf('%.*c', x'31303030303030303030', 'x')",  # precision as a BLOB of digits
    "SELECT printf('%*.*c', 1.0e9, 2.5e9, 'x')",  # real width and precision
]


#: Formats a guard that does not walk the format as SQLite does gets wrong: the
#: ``*`` argument it checks is not the one SQLite reads, or each size passes alone.
PARSE_BYPASSES = [
    "SELECT printf('%n%.*c', 1000000000, 'x')",  # %n takes no argument in SQL
    "SELECT printf('%.c%.*c', 'x', 1000000000, 'y')",  # '.' without digits is precision 0
    "SELECT printf('%5%%*c', 1000000000, 'x')",  # %% with a width takes no argument either
    # 4,000 x %.200000c: each under the cap, but SQLite pads them all even past its length limit (6 s)
    "SELECT printf(replace(hex(zeroblob(4000)), '00', '%.200000c'), 'x')",
]


def _run_guarded(tiny_db, queries: list[str]) -> dict:
    return measure(tiny_db, "", """
        from jaxsql.sql import execute
        execute(DB, "SELECT 1")
        res = []
        for sql in %r:
            t = time.perf_counter()
            r = execute(DB, sql, timeout_s=1.0)
            res.append([sql, r.ok, r.rows, r.error, time.perf_counter() - t])
        out["results"] = res
    """ % (queries,))


def test_type_bypassed_printf_guard(tiny_db):
    out = _run_guarded(tiny_db, TYPE_BYPASSES)
    for sql, ok, rows, error, wall in out["results"]:
        assert ok and rows == [[None]], (sql, ok, rows, error)  # NULL, SQLite's answer for an over-long result
        assert wall < 0.3, (sql, wall)  # refused up front, not stopped by the deadline
    assert out["self_peak_mb"] < SELF_BOUND_MB, out
    assert out["children_peak_mb"] < 100, out


def test_printf_guard_reads_the_format_as_sqlite_does(tiny_db):
    out = _run_guarded(tiny_db, PARSE_BYPASSES)
    for sql, ok, rows, error, wall in out["results"]:
        assert ok and rows == [[None]], (sql, ok, rows, error)
        assert wall < 0.3, (sql, wall)
    assert out["children_peak_mb"] < 100, out


def test_printf_guard_keeps_ordinary_formatting(tiny_db):
    r = execute(tiny_db, "SELECT printf('%*d|%.*f|%s', '5', 42, x'32', 3.14159, CAST('ab' AS BLOB)), "
                         "printf(CAST('%d-%d' AS BLOB), 1, 2)")
    assert r.rows == (("   42|3.14|ab", "1-2"),), r
    # the conversions that take no argument, a precision of no digits, size modifiers, big values
    r = execute(tiny_db, "SELECT printf('%n|%d|%.c|%5%|%lld|%,d|%.*f|%*d', 7, 'q', 5, 1234567, 2, 300000.5, "
                         "3, 1000000), length(printf('%.100000c%.100000c', 'x', 'y')), printf('%y%d', 1)")
    assert r.rows == (("|7|q|    %|5|1,234,567|300000.50|1000000", 200000, None),), r


# -- 4. transient failures are never cached ------------------------------------------------------

@pytest.fixture
def rollback_db(tmp_path) -> Path:
    path = tmp_path / "locked.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x INTEGER)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(10)])
    con.commit()
    con.close()
    return path


def test_lock_released_mid_run_is_not_cached(rollback_db):
    from jaxsql.sql import SqlPool

    db = str(rollback_db)
    writer = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
    with SqlPool(2) as pool:
        assert pool.execute_batch([(db, "SELECT count(*) FROM t")])[0].rows == ((10,),)  # a cached connection
        writer.execute("BEGIN EXCLUSIVE")
        preds, golds = pool.run_batch([(db, "SELECT sum(x) FROM t"), (db, "SELECT count(*) FROM t WHERE x > 2")],
                                      [("ex1", db, "SELECT max(x) FROM t")])
        assert [r.error for r in preds + golds] == ["busy"] * 3, preds + golds
        s = pool.stats()
        assert s["errors"]["busy"] == 3 and s["gold_cached"] == 0 and s["cached"] == 1
        writer.execute("ROLLBACK")
        preds, golds = pool.run_batch([(db, "SELECT sum(x) FROM t"), (db, "SELECT count(*) FROM t WHERE x > 2")],
                                      [("ex1", db, "SELECT max(x) FROM t")])
        assert [r.rows for r in preds + golds] == [((45,),), ((7,),), ((9,),)]
    # a lock released while the query is retrying: the query succeeds
    import threading

    writer.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.15, lambda: writer.execute("ROLLBACK")).start()
    r = execute(db, "SELECT count(*) FROM t")
    assert r.rows == ((10,),), r
    writer.close()


# -- 5. WAL databases ---------------------------------------------------------------------------

def _wal_db(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "wal.sqlite"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE t (x INTEGER)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(5)])
    con.commit()
    con.close()  # the last connection checkpoints and removes -wal and -shm
    assert sorted(os.listdir(folder)) == ["wal.sqlite"]
    return path


def test_wal_database_opened_without_creating_files(tmp_path):
    from jaxsql.sql import SqlPool

    db = _wal_db(tmp_path / "ro")
    os.chmod(db.parent, 0o555)
    try:
        assert execute(db, "SELECT count(*) FROM t").rows == ((5,),)
        with SqlPool(1) as pool:
            assert pool.execute_batch([(str(db), "SELECT sum(x) FROM t")])[0].rows == ((10,),)
        # root may write anywhere: what this checks is that nothing tried
        assert sorted(os.listdir(db.parent)) == ["wal.sqlite"]
    finally:
        os.chmod(db.parent, 0o755)


def test_wal_database_follows_a_writer(tmp_path):
    """While a writer has it open (a -wal file exists), committed writes are seen; then immutable again."""
    from jaxsql.sql import SqlPool

    db = _wal_db(tmp_path / "w")
    with SqlPool(1, cache_size=0) as pool:
        assert pool.execute_batch([(str(db), "SELECT count(*) FROM t")])[0].rows == ((5,),)
        writer = sqlite3.connect(db)
        writer.execute("INSERT INTO t VALUES (99)")
        writer.commit()
        assert (db.parent / "wal.sqlite-wal").exists()
        assert pool.execute_batch([(str(db), "SELECT count(*) FROM t")])[0].rows == ((6,),)
        writer.close()
        assert pool.execute_batch([(str(db), "SELECT count(*) FROM t")])[0].rows == ((6,),)


def test_wal_database_in_a_read_only_folder(tmp_path):
    """A read-only bind mount in a private mount namespace: not even root can create -wal/-shm there."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs root and unshare/mount for a read-only bind mount")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode()[-200:]}")
    db = _wal_db(tmp_path / "ro")
    reader = textwrap.dedent(f"""
        import sqlite3, sys
        sys.path.insert(0, {str(REPO)!r})
        from jaxsql.sql import execute, SqlPool
        try:
            open({str(db.parent / "probe")!r}, "w")
            print("writable")
        except OSError:
            pass
        try:  # what a plain read-only open does here: proves the folder really is read-only
            sqlite3.connect("file:{db}?mode=ro", uri=True).execute("SELECT count(*) FROM t").fetchall()
            print("plain-open-worked")
        except sqlite3.Error:
            print("plain-open-failed")
        print(execute({str(db)!r}, "SELECT count(*) FROM t").rows)
        with SqlPool(1) as pool:
            print(pool.execute_batch([({str(db)!r}, "SELECT sum(x) FROM t")])[0].rows)
    """)
    script = f"mount --bind -o ro {db.parent} {db.parent} && exec {sys.executable} -c \"$0\""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, reader],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["plain-open-failed", "((5,),)", "((10,),)"], proc.stdout + proc.stderr
    assert sorted(os.listdir(db.parent)) == ["wal.sqlite"]


def test_wal_database_with_a_wal_file_in_a_read_only_folder_says_why(tmp_path):
    """A -wal file (a copy taken while a writer had it open) cannot be read without creating -shm: say so."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs root and unshare/mount for a read-only bind mount")
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a mount namespace")
    live = _wal_db(tmp_path / "live")
    writer = sqlite3.connect(live)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("INSERT INTO t VALUES (100)")
    writer.commit()
    (tmp_path / "ro").mkdir()
    db = tmp_path / "ro" / "wal.sqlite"
    shutil.copy(live, db)
    shutil.copy(f"{live}-wal", f"{db}-wal")
    writer.close()
    reader = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from jaxsql.sql import execute
        r = execute({str(db)!r}, "SELECT count(*) FROM t")
        print(r.error, r.message)
    """)
    script = f"mount --bind -o ro {db.parent} {db.parent} && exec {sys.executable} -c \"$0\""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, reader],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("db_missing ") and "cannot create the -shm file" in proc.stdout, proc.stdout
    assert sorted(os.listdir(db.parent)) == ["wal.sqlite", "wal.sqlite-wal"]


# -- 6. host-side work on the query text ---------------------------------------------------------

def test_cache_key_of_hostile_query_text_is_linear(tiny_db):
    """Cache keys are computed in the caller: 'SELECT [[[[...' (1 MB) would take minutes through the
    old whitespace regex (quadratic: 80 KB took 5 s); a pool keys and answers it at once."""
    out = measure(tiny_db, "", """
        from jaxsql.sql.normalize import normalize_sql
        queries = ["SELECT " + "[" * 1_000_000, "SELECT " + "[ '" * 300_000, "SELECT " + "a " * 1_000_000]
        with SqlPool(1) as pool:
            pool.execute_batch([(DB, "SELECT 1")])
            cpu = time.process_time()
            r = pool.execute_batch([(DB, q) for q in queries])
            out["pool_cpu_s"] = time.process_time() - cpu
        out["failed"] = [not x.ok for x in r]
        from jaxsql.compare import has_top_level_order_by
        cpu = time.process_time()
        for q in queries:
            normalize_sql(q + " ")  # not the cached key
        out["ordered"] = has_top_level_order_by(queries[0] + " ORDER BY 1")  # the same scan, for comparisons
        out["keys_cpu_s"] = time.process_time() - cpu
    """)
    assert out["failed"] == [True] * 3 and out["ordered"] is True, out
    assert out["keys_cpu_s"] < 2.0, out  # measured 0.45-0.65 s (load 12)
    assert out["pool_cpu_s"] < 4.0, out  # keys, 4 MB through the pipe and back in the messages
