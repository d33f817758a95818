"""Start-up stress: N fresh processes of one probe, in sequence or K at once, counting how each one ended.

Not a test (minutes to hours). Every probe process starts Jittor from scratch, so it exercises what a new job does
first: set-up, loading (or compiling) thousands of kernels on Jittor's compile threads, one forward or a few steps.
Each runs in its own session under a timeout; a process still running at the timeout is a hang (optionally its
threads' backtraces are taken with gdb before it is killed). Exits are classified by their signature in the
output: a segfault in a compile thread, glibc heap-corruption messages, Jittor "Check failed" errors, a Python
traceback, a signal, a plain non-zero exit.

Probes (each a fresh `python` process, run from the repository root):
  backbones  runtime.setup("cpu"); build resnet101, van_b0, van_b3 with BACKBONES.build; one eval-mode forward of a
             1x3x96x128 input each; exit
  train      `python run.py experiment=smoke` cut to 20 iterations (64x64 crops, batch 2, head_channels 16, two
             val images), backbone resnet101, van_b0, van_b3 in turn (run i uses the (i mod 3)-th)
  eval       `python run.py job=eval` of one ResNet-101 checkpoint (made once, by a 1-iteration training, before
             the probes), four val images
  heavy      (for experiments) twice the kernels of `backbones`: a training step (forward, grads) and an eval
             forward of resnet101, van_b0, van_b3 and resnet50
  fresh      (for experiments) `backbones` plus 8 kernels new to the cache, compiled by g++ on the compile threads
  relay      (for experiments) the minimal reproduction: 54 depthwise convolutions, forward and backward, whose
             kernels Jittor's conv tuner relays to oneDNN while compiling them

    python benchmarks/stress.py backbones -n 100
    python benchmarks/stress.py backbones -n 40 --parallel 2           # 20 rounds of 2 processes at once
    python benchmarks/stress.py train -n 30 --timeout 600
    python benchmarks/stress.py backbones -n 30 --env use_parallel_op_compiler=0 --label serial
    python benchmarks/stress.py backbones -n 30 --gdb-on-hang          # backtraces of hung processes

Prints a Markdown table and writes benchmarks/results/stress_<probe>_<date>[_<label>].json (every run: exit code,
signal, seconds, signature, the matching line, the output's tail, load average before and after); with
--logs DIR each run's whole output is kept there too. Processes in parallel share Jittor's kernel cache, as jobs
on one machine do.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_BACKBONES = ("resnet101", "van_b0", "van_b3")
SMALL_TRAIN = [
    "experiment=smoke",
    "schedule.iters=20",
    "schedule.crop_size=[64,64]",
    "schedule.batch_size=2",
    "schedule.checkpoint_every=20",
    "schedule.log_every=10",
    "backbone.head_channels=16",
    "eval.max_images=2",
    "eval.num_vis=0",
]

# (signature, pattern), first match wins; checked against the whole output of a run that did not exit 0
SIGNATURES = [
    (
        "compile-thread segfault",
        re.compile(
            r"Caught segfault at address \S+, thread_name: 'C\d+'|Segfault happen"
            r"|ccnet: fatal SIGSEGV .*not the main thread"
        ),
    ),
    ("segfault", re.compile(r"Caught segfault|Segmentation fault|ccnet: fatal SIGSEGV")),
    (
        "glibc heap corruption",
        re.compile(
            r"corrupted size vs\. prev_size|double free|malloc\(\)|free\(\): invalid|corrupted double-linked"
            r"|munmap_chunk|unaligned tcache|malloc_consolidate|corrupted top size"
        ),
    ),
    ("fatal signal", re.compile(r"ccnet: fatal .*")),
    ("jittor check failed", re.compile(r"Check failed")),
    ("python exception", re.compile(r"Traceback \(most recent call last\)")),
]


# ------------------------------------------------------------------------------------------------ probes


def probe_backbones() -> None:
    from ccnet import runtime

    jt = runtime.setup("cpu")
    import numpy as np

    from ccnet.registry import BACKBONES

    x = jt.array(np.random.default_rng(0).standard_normal((1, 3, 96, 128)).astype(np.float32))
    for name in ("resnet101", "van_b0", "van_b3"):
        model = BACKBONES.build(name)
        model.eval()
        _, feature = model(x)
        print(name, tuple(feature.shape), float(feature.mean()), flush=True)


def probe_heavy() -> None:
    """More kernels per process (about 160 vs 80): each backbone's training step (forward + grads of all
    parameters at 2x3x64x64) and an eval forward; for the experiments on the cause, not one of the targets."""
    from ccnet import runtime

    jt = runtime.setup("cpu")
    import numpy as np

    from ccnet.registry import BACKBONES

    rng = np.random.default_rng(0)
    x_eval = jt.array(rng.standard_normal((1, 3, 96, 128)).astype(np.float32))
    x_train = jt.array(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    for name in ("resnet101", "van_b0", "van_b3", "resnet50"):
        model = BACKBONES.build(name)
        model.train()
        aux, feature = model(x_train)
        jt.sync(jt.grad(feature.sum() + aux.sum(), model.parameters()))
        model.eval()
        with jt.no_grad():
            print(name, float(model(x_eval)[1].mean()), flush=True)


def probe_fresh() -> None:
    """`backbones`, plus 8 small kernels that exist in no cache (a nonce in their source), synced together with the
    first forward: Jittor's compile threads run g++ for those while they load the cached ones. For experiments;
    run it with a cache of its own (`--env cache_name=NAME`), it leaves 8 kernels per run in the cache."""
    from ccnet import runtime

    jt = runtime.setup("cpu")
    import os
    import time

    import numpy as np

    from ccnet.registry import BACKBONES

    nonce = f"{os.getpid()}_{time.time_ns()}"
    x = jt.array(np.random.default_rng(0).standard_normal((1, 3, 96, 128)).astype(np.float32))
    fresh = [
        jt.code(x.shape, x.dtype, [x], cpu_header=f"// {nonce} {i}", cpu_src=f"out0_p[0] = in0_p[0] + {i};")
        for i in range(8)
    ]
    for name in ("resnet101", "van_b0", "van_b3"):
        model = BACKBONES.build(name)
        model.eval()
        _, feature = model(x)
        jt.sync([feature, *fresh])
        print(name, tuple(feature.shape), float(feature.mean()), flush=True)


def probe_relay() -> None:
    """The minimal reproduction of the crash: 54 depthwise convolutions (kernel 3/5/7, dilation 1/2/3, stride 1/2,
    8/16/24 channels), forward and backward, compiled in one go; Jittor's conv tuner relays each to oneDNN, which
    adds ops to the shared graph while the kernel is being compiled."""
    from ccnet import runtime

    jt = runtime.setup("cpu")
    import numpy as np
    from jittor import nn

    x = jt.array(np.random.default_rng(0).standard_normal((2, 24, 20, 20)).astype(np.float32))
    loss = 0
    for k, d, s, c in itertools.product((3, 5, 7), (1, 2, 3), (1, 2), (8, 16, 24)):
        y = nn.Conv2d(c, c, k, stride=s, padding=d * (k // 2), dilation=d, groups=c)(x if c == 24 else x[:, :c])
        loss = loss + (y * y).mean()
    jt.sync(jt.grad(loss, [x]) + [loss])
    print("loss", float(loss), flush=True)


PROBES = {"backbones": probe_backbones, "heavy": probe_heavy, "fresh": probe_fresh, "relay": probe_relay}


def probe_command(probe: str, index: int, work: Path) -> list[str]:
    """The command line of run `index` of `probe`; `work` is a scratch folder shared by all runs."""
    if probe in PROBES:
        return [sys.executable, str(Path(__file__).resolve()), "--child", probe]
    run_dir = work / f"run_{index:04d}"
    if probe == "train":
        backbone = TRAIN_BACKBONES[index % len(TRAIN_BACKBONES)]
        return [sys.executable, "run.py", *SMALL_TRAIN, f"backbone={backbone}", f"hydra.run.dir={run_dir}"]
    if probe == "eval":
        return [
            sys.executable,
            "run.py",
            "job=eval",
            f"checkpoint={work / 'checkpoint'}",
            "eval.max_images=4",
            "eval.num_vis=0",
            f"hydra.run.dir={run_dir}",
        ]
    raise ValueError(probe)


def prepare(probe: str, work: Path, env: dict, timeout: float) -> None:
    """The eval probe's checkpoint: one ResNet-101 training iteration (not counted among the runs)."""
    if probe != "eval":
        return
    cmd = [sys.executable, "run.py", *SMALL_TRAIN, "schedule.iters=1", "schedule.checkpoint_every=1"]
    cmd += ["backbone=resnet101", "eval.max_images=1", f"hydra.run.dir={work / 'checkpoint'}"]
    for attempt in range(3):  # the set-up run may itself hit what is being measured
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode == 0:
            return
        print(f"making the eval checkpoint failed (attempt {attempt + 1}):\n{result.stderr[-2000:]}", file=sys.stderr)
    sys.exit("could not make the eval probe's checkpoint")


# ---------------------------------------------------------------------------------------------- running


def classify(returncode: int | None, output: str, waiting_for: str = "") -> tuple[str, str]:
    """(signature, the line that shows it) of a finished run; returncode None = still running at the timeout,
    `waiting_for` = what the hung process's main thread was waiting for, if known."""
    if returncode is None:
        first = next((m for _, p in SIGNATURES for m in [p.search(output)] if m), None)
        if first:
            return "hang after a crash", _line_of(output, first)
        return ("hang: waiting for jittor.lock", waiting_for) if waiting_for else ("hang", "")
    if returncode == 0:
        return "ok", ""
    for name, pattern in SIGNATURES:
        match = pattern.search(output)
        if match:
            return name, _line_of(output, match)
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}", ""
    return f"exit {returncode}", output.strip().splitlines()[-1][:300] if output.strip() else ""


def native_stack(output: str) -> list[str]:
    """The crashed thread's frames that ccnet's crash guard printed (function names only), else []."""
    lines = output.splitlines()
    try:
        first = lines.index("native stack of the crashed thread:") + 1
    except ValueError:
        return []
    frames = []
    for line in lines[first:]:
        if not line.startswith("/"):
            break
        frames.append(line.rsplit("/", 1)[-1].split("[0x")[0])  # "libx.so(symbol+0x4d)"
    return frames


def _line_of(text: str, match: re.Match) -> str:
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    return text[start : end if end >= 0 else len(text)].strip()[:300]


def lock_holder(pid: int) -> str:
    """When `pid`'s main thread waits for a POSIX file lock (Jittor's cache lock): who holds it, else ""."""
    try:
        if Path(f"/proc/{pid}/wchan").read_text().strip() != "fcntl_setlk":
            return ""
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    # "1: POSIX  ADVISORY  WRITE <holder> dev:inode 0 EOF" then "1: -> POSIX ... <waiter> ..." lines
    waited = next((ln for ln in locks if "->" in ln and ln.split()[5] == str(pid)), None)
    if waited is None:
        return "a file lock"
    holder = next(ln for ln in locks if ln.split()[0] == waited.split()[0] and "->" not in ln).split()[4]
    try:
        cmd = Path(f"/proc/{holder}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = "?"
    return f"a file lock held by pid {holder}: {cmd[:200]}"


def backtrace(pid: int) -> str:
    """All threads' backtraces of a running process (gdb attaches, prints, detaches)."""
    cmd = ["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "set pagination off", "-ex", "thread apply all bt"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"gdb failed: {err}"


def start(probe: str, index: int, work: Path, env: dict, logs: Path) -> dict:
    log_file = open(logs / f"{probe}_{index:04d}.log", "w+")
    proc = subprocess.Popen(
        probe_command(probe, index, work),
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a hang is killed whole, compile workers included
    )
    return dict(index=index, proc=proc, log=log_file, t0=time.monotonic(), load_before=os.getloadavg()[0])


def finish(run: dict, hung: bool, gdb: bool, logs: Path) -> dict:
    proc, index = run["proc"], run["index"]
    trace, waiting_for = None, ""
    if hung:
        waiting_for = lock_holder(proc.pid)
        if gdb:
            trace = backtrace(proc.pid)
            (logs / f"backtrace_{index:04d}.txt").write_text(trace)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = time.monotonic() - run["t0"]
    run["log"].seek(0)
    output = run["log"].read()
    run["log"].close()
    code = None if hung else proc.returncode
    signature, line = classify(code, output, waiting_for)
    return dict(
        index=index,
        exit_code=proc.returncode,
        signal=signal.Signals(-proc.returncode).name if proc.returncode < 0 else None,
        hung=hung,
        seconds=round(seconds, 2),
        signature=signature,
        line=line,
        tail=output.strip().splitlines()[-15:] if signature != "ok" else [],
        native_stack=native_stack(output),
        backtrace=trace,
        load_before=round(run["load_before"], 2),
        load_after=round(os.getloadavg()[0], 2),
        log=run["log"].name,
    )


def run_all(args, env: dict, work: Path, logs: Path) -> list[dict]:
    """Runs in rounds of `parallel` processes started together; each round waits for all its processes."""
    results: list[dict] = []
    for first in range(0, args.n, args.parallel):
        batch = [start(args.probe, i, work, env, logs) for i in range(first, min(first + args.parallel, args.n))]
        for run in batch:
            left = args.timeout - (time.monotonic() - run["t0"])
            try:
                run["proc"].wait(timeout=max(left, 0.1))
                hung = False
            except subprocess.TimeoutExpired:
                hung = True
            result = finish(run, hung, args.gdb_on_hang, logs)
            results.append(result)
            mark = "ok" if result["signature"] == "ok" else f"{result['signature']}: {result['line'][:120]}"
            print(f"[{result['index'] + 1}/{args.n}] {result['seconds']:.1f}s load {result['load_after']:.1f} {mark}")
            sys.stdout.flush()
    return results


def _commit() -> str:
    """The checked-out commit (+ "-dirty" with uncommitted changes), so that a result names the code it measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "?"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def summary_table(results: list[dict]) -> str:
    counts = Counter(r["signature"] for r in results)
    lines = ["| outcome | runs | share |", "|---|---|---|"]
    for name, n in sorted(counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1])):
        lines.append(f"| {name} | {n} | {100 * n / len(results):.0f}% |")
    ok_times = [r["seconds"] for r in results if r["signature"] == "ok"]
    if ok_times:
        lines.append(f"\nseconds per good run: median {statistics.median(ok_times):.1f}, max {max(ok_times):.1f}")
    loads = [r["load_before"] for r in results] + [r["load_after"] for r in results]
    lines.append(
        f"1-minute load average: min {min(loads):.1f}, median {statistics.median(loads):.1f}, max {max(loads):.1f}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["backbones", "train", "eval", "heavy", "fresh", "relay"])
    parser.add_argument("-n", type=int, default=30, help="processes in all")
    parser.add_argument("--parallel", type=int, default=1, help="processes started at once (rounds of K)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process (default 240; train 900)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment of the probes")
    parser.add_argument("--gdb-on-hang", action="store_true", help="save gdb backtraces of hung processes")
    parser.add_argument("--label", default="", help="added to the JSON file's name")
    parser.add_argument("--logs", type=Path, default=None, help="keep each run's output here")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.timeout = args.timeout or (900.0 if args.probe == "train" else 240.0)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    extra = dict(item.split("=", 1) for item in args.env)
    env.update(extra)
    date = datetime.date.today().isoformat()
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"stress_{args.probe}_{date}{'_' + args.label if args.label else ''}.json"
    )

    with tempfile.TemporaryDirectory(prefix=f"stress_{args.probe}_") as tmp:
        work = Path(tmp)
        logs = args.logs or work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        prepare(args.probe, work, env, args.timeout)
        started, commit = datetime.datetime.now().isoformat(timespec="seconds"), _commit()
        t0 = time.monotonic()
        results = run_all(args, env, work, logs)
        wall = time.monotonic() - t0
        if args.logs is None:  # the scratch folder goes away
            for r in results:
                r.pop("log")

    table = summary_table(results)
    title = f"{args.probe}: {args.n} processes, {args.parallel} at a time, timeout {args.timeout:.0f}s"
    print(f"\n{title}" + (f", env {extra}" if extra else "") + f"\n\n{table}")
    record = dict(
        probe=args.probe,
        n=args.n,
        parallel=args.parallel,
        timeout_s=args.timeout,
        env=extra,
        label=args.label,
        started=started,
        wall_s=round(wall, 1),
        cpus=os.cpu_count(),
        commit=commit,
        outcomes=dict(Counter(r["signature"] for r in results)),
        runs=results,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        PROBES[sys.argv[sys.argv.index("--child") + 1]]()
    else:
        sys.exit(main())
