"""The ``olrec`` command: ``olrec learn``, ``train``, ``serve`` and ``demo``.

Errors a user can fix (a bad config, a missing file, a wrong format) end with
exit status 2 and one line ``olrec: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import storage
from .config import Config, ConfigError, build_learner, check_local_dir, load_config
from .learner import LearnerConfig

REPO = Path(__file__).resolve().parents[1]
_ROW = "__olrec_row"  # row number carried through validation onto rejected rows
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-100k"


class UsageError(Exception):
    """A problem with the user's input, reported as ``olrec: error: ...``."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="olrec", description="olrec: an online-learning recommender. Learns from every event as it arrives.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{learn,train,serve,demo}")

    learn = sub.add_parser(
        "learn", help="learn a stream of events online and report progressive metrics",
        description="Learn events in stream order, scoring each micro-batch before learning it "
                    "(progressive validation), with a frozen copy taken at the split as the baseline. "
                    "Prints a summary and writes a JSON report and a PNG of windowed AUC.")
    learn.add_argument("--events", type=Path, help="the events: the ml-100k directory, or a CSV/Parquet/JSONL file "
                                                   "or directory of them (generic); not needed for synthetic")
    learn.add_argument("--format", choices=["ml100k", "generic", "synthetic"],
                       help="how to read --events (default: the config's data.format, else ml100k)")
    learn.add_argument("--columns", nargs="+", metavar="OLD=NEW", default=None,
                       help="rename generic columns to the schema's names, e.g. uid=user_id clicked=label")
    learn.add_argument("--config", type=Path, help="a YAML config (see cluster/jobs/ml100k.yaml); flags override it")
    learn.add_argument("--report-dir", type=Path, help="where the report and dead-letter.jsonl (rejected rows of generic files, "
                       "with reasons) go (default: reports/<name>)")
    learn.add_argument("--batch-size", type=int, help=f"micro-batch size after the warm-up (default {LearnerConfig.batch_size})")
    learn.add_argument("--max-events", type=int, help="learn only the first N events")
    learn.add_argument("--quiet", action="store_true", help="no progress bar")

    tr = sub.add_parser(
        "train", help="train on a Ray cluster: parameter-server shards, Ray Train workers, checkpoints",
        description="Train online on Ray: the run's event log (RUN_DIR/log, filled from --data when empty) "
                    "streams through Ray Data to Ray Train workers; per-id state lives in shard actors; "
                    "checkpoints with the watermark go to RUN_DIR/checkpoints, and a restarted run resumes "
                    "from the latest. Connects to the cluster in $RAY_ADDRESS (as `ray job submit` sets it), "
                    "else starts a local one. Prints the final metrics as JSON and writes RUN_DIR/train.json.")
    tr.add_argument("--config", type=Path, help="a YAML config (see cluster/jobs/ml100k.yaml); flags override it")
    tr.add_argument("--data", "--events", dest="events", type=Path,
                    help="the events to fill an empty log with (an absolute path: a job runs from a copy of "
                         "the working directory); default $OLREC_DATA or the config's data.path")
    tr.add_argument("--format", choices=["ml100k", "generic", "synthetic"], help="how to read --data")
    tr.add_argument("--run-dir", help="the run's directory (log, checkpoints, ledger; default runs/train), "
                                      "or an object-store URI (s3://bucket/run?endpoint_override=...)")
    tr.add_argument("--workers", type=int, help="Ray Train workers")
    tr.add_argument("--shards", type=int, help="parameter-server shard actors")
    tr.add_argument("--max-events", type=int, help="fill the log with only the first N events")
    tr.add_argument("--continuous", action="store_true", help="follow the log until stopped (Ctrl-C, SIGTERM, "
                                                              "or RUN_DIR/STOP), with a final checkpoint")

    sv = sub.add_parser(
        "serve", help="serve a run's model over gRPC with Ray Serve (and a local Triton)",
        description="Serve the model of RUN_DIR (olrec.v1.Recommender over gRPC, through Ray Serve's proxy): live "
                    "rows from the run's parameter-server shards while `olrec train --continuous` runs on the same "
                    "cluster, else its newest checkpoint and the rows each published version changed since. Starts a local Triton for the int8 ranking model unless "
                    "--triton-url or --scorer in_process. Connects to $RAY_ADDRESS, else starts a local cluster. "
                    "Runs until Ctrl-C.")
    sv.add_argument("--run-dir", required=True, help="the olrec train run to serve (a directory or a URI)")
    sv.add_argument("--port", type=int, default=9000, help="the gRPC port (default 9000)")
    sv.add_argument("--scorer", choices=["triton", "in_process"], default="triton")
    sv.add_argument("--precision", choices=["int8", "fp32"], default="int8", help="of the ranking model in Triton")
    sv.add_argument("--triton-url", help="a running Triton's gRPC host:port (default: start one)")
    sv.add_argument("--replicas", type=int, default=1, help="Recommender replicas (default 1)")
    sv.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs each replica reserves (default 0.5)")

    demo = sub.add_parser(
        "demo", help="the closed loop: replay MovieLens-100K into the log, train on Ray, serve over gRPC, measure",
        description="The whole loop on an embedded local Ray cluster (or $RAY_ADDRESS's): parameter-server shards and "
                    "Ray Train workers following the event log, Triton, the Serve gRPC app. MovieLens-100K is "
                    "replayed into the log in time order (with a share of malformed events, dead-lettered), while "
                    "simulated users call Recommend and send Feedback over gRPC. Halfway through the replay the "
                    "model is checkpointed as the frozen baseline, which scores the rest without learning. A live "
                    "view shows the loop; at the end (the replay done, --max-events or --duration reached, or "
                    "Ctrl-C) a JSON report and PNG plots are written and every process is stopped. The data path "
                    "comes from --data, else $OLREC_DATA, else ../shared/data/ml-100k beside the repo.")
    demo.add_argument("--data", type=Path, help="the ml-100k directory")
    demo.add_argument("--rate", type=float, default=2000.0, help="events replayed per second (default 2000)")
    demo.add_argument("--max-events", type=int, help="replay only the first N events (default: all 100,000)")
    demo.add_argument("--duration", type=float, help="replay for at most this many seconds")
    demo.add_argument("--request-rate", type=float, default=50.0, help="Recommend calls per second (default 50)")
    demo.add_argument("--feedback", type=float, default=0.5,
                      help="share of answers whose user sends Feedback on the top item, sent batched once a second (default 0.5)")
    demo.add_argument("--malformed", type=float, default=0.001,
                      help="malformed events sent per replayed event, to be dead-lettered (default 0.001)")
    demo.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    demo.add_argument("--shards", type=int, default=1, help="parameter-server shard actors (default 1)")
    demo.add_argument("--replicas", type=int, default=1, help="Recommender replicas (default 1)")
    demo.add_argument("--scorer", choices=["triton", "in_process"], default="triton",
                      help="rank in Triton (int8) or in the replica (default triton)")
    demo.add_argument("--port", type=int, default=9000, help="the gRPC port (default 9000)")
    demo.add_argument("--run-dir", default="runs/demo",
                      help="the run's directory on this machine, emptied first (default runs/demo)")
    demo.add_argument("--report", type=Path, default=Path("reports/demo/demo.json"),
                      help="the JSON report; the plots go beside it (default reports/demo/demo.json)")
    demo.add_argument("--linger", type=float, default=0.0,
                      help="keep the service, the trainers and the dashboard up this many seconds after the report")
    demo.add_argument("--quiet", action="store_true", help="no live view")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if getattr(args, "events", None) is not None:
        data["path"] = str(args.events)
    if getattr(args, "format", None):
        data["format"] = args.format
    if getattr(args, "columns", None):
        mapping = {}
        for pair in args.columns:
            old, sep, new = pair.partition("=")
            if not sep or not old or not new:
                raise UsageError(f"--columns takes OLD=NEW pairs, got {pair!r}")
            mapping[old] = new
        data["columns"] = mapping
    if getattr(args, "max_events", None) is not None:
        data["max_events"] = args.max_events
    out: dict[str, Any] = {"data": data} if data else {}
    if getattr(args, "batch_size", None) is not None:
        out["learner"] = {"batch_size": args.batch_size}
    if getattr(args, "report_dir", None) is not None:
        out["report"] = {"dir": str(args.report_dir)}
    train = {k: getattr(args, k) for k in ("workers", "shards") if getattr(args, k, None) is not None}
    if getattr(args, "run_dir", None) is not None:
        train["run_dir"] = str(args.run_dir)
    if getattr(args, "continuous", False):
        train["continuous"] = True
    if train:
        out["train"] = train
    return out


def load_events(cfg: Config, dead_letter: Path | str):
    """The configured events as a validated table; malformed rows go to ``dead_letter``."""
    import numpy as np
    import pyarrow as pa

    from .schema import validate
    from .sources import read_files, read_ml100k, read_synthetic

    d = cfg.data
    if d.format == "synthetic":
        events = read_synthetic(d.synthetic).drop(["p_true"])
        n_bad = 0
    else:
        if d.path is None:
            raise UsageError(f"no events given: pass --events (format {d.format})")
        if not d.path.exists():
            raise UsageError(f"events path {d.path} does not exist")
        try:
            raw = read_ml100k(d.path) if d.format == "ml100k" else read_files(d.path, d.columns or None)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (an unparsable CSV) is a ValueError
            raise UsageError(f"cannot read {d.path} as {d.format} events: {' '.join(str(e).split())}") from None
        if d.format == "ml100k":
            events, n_bad = raw, 0
        else:
            # A row number travels through validation onto each rejected row.
            split = validate(raw.append_column(_ROW, pa.array(np.arange(raw.num_rows, dtype=np.int64))))
            events, n_bad = split.good.drop_columns([_ROW]), split.n_bad
            reasons = _write_dead_letters(split.bad, dead_letter)
            if events.num_rows == 0:
                why = "; ".join(f"{r} ({k} rows)" for r, k in reasons.items())
                raise UsageError(f"no valid events in {d.path}: {why}; rejected rows in {dead_letter}")
    if d.max_events is not None:
        events = events.slice(0, d.max_events)
    if events.num_rows == 0:
        raise UsageError(f"no valid events in {d.path or 'the synthetic stream'}")
    assert isinstance(events, pa.Table)
    return events, n_bad


def _write_dead_letters(bad, path: Path | str) -> dict[str, int]:
    """Rewrite ``path`` (a local path or an object-store URI) with this run's rejected rows
    (empty when none): one JSON object per row, its cells as text, ``row`` (0-based, in
    file order) and ``reason``. Returns the count per reason."""
    reasons: dict[str, int] = {}
    lines = []
    for rec in bad.to_pylist():
        row = rec.pop(_ROW, None)
        rec["row"] = None if row is None else int(row)
        reasons[rec["reason"]] = reasons.get(rec["reason"], 0) + 1
        lines.append(json.dumps(rec) + "\n")
    storage.write_bytes(path, "".join(lines).encode())
    return reasons


def run_learn(cfg: Config, *, quiet: bool = False) -> dict[str, Any]:
    """Learn the configured events, print a summary, write the report; its paths and key figures."""
    from .progressive import run_progressive
    from .report import format_summary, write_report

    name = cfg.report.name_for(cfg.data)
    out_dir = cfg.report.dir_for(cfg.data)
    dead_letter = out_dir / "dead-letter.jsonl"
    events, n_bad = load_events(cfg, dead_letter)
    if n_bad:
        print(f"olrec: {n_bad} malformed row(s) skipped, reasons in {dead_letter}", file=sys.stderr)
    spec = cfg.feature_spec(events)
    learner = build_learner(spec, cfg.learner)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=events.num_rows, unit="ev", unit_scale=True, desc="learning", file=sys.stderr)

    def progress(p) -> None:
        bar.update(p.events - bar.n)
        bar.set_postfix_str(f"{p.events_per_s:,.0f} ev/s, AUC {p.auc:.4f}")

    started = time.perf_counter()
    result = run_progressive(events, learner, frozen_at=cfg.report.frozen_at, progress=progress if bar else None)
    if bar is not None:
        bar.close()
    print(format_summary(result))
    json_path, png_path = write_report(
        result, out_dir, name=name, config_dict=cfg.to_dict(spec), window=cfg.report.window_for(events.num_rows),
        extra={"dead_lettered": n_bad, "wall_seconds": time.perf_counter() - started})
    print(f"report: {json_path}\nplot:   {png_path}")
    return {"json": json_path, "png": png_path, "dead_lettered": n_bad}


def run_train(cfg: Config) -> dict[str, Any]:
    """``olrec train``: fill the run's log when it is empty, then train on Ray."""
    import math
    import signal
    import threading

    import pyarrow as pa
    import ray

    from .log import OFFSET, EventLog
    from .rayenv import init_ray
    from .train import RunPaths, train

    paths = RunPaths.of(cfg.run_dir)
    log = EventLog(paths.log)
    if log.end_offset == 0 and (cfg.data.path is not None or cfg.data.format == "synthetic"):
        events, n_bad = load_events(cfg, storage.join(paths.root, "dead-letter.jsonl"))
        with log.open_writer() as w:
            for at in range(0, events.num_rows, 65536):
                w.append(events.slice(at, 65536))
        print(f"olrec: {events.num_rows} events appended to {storage.where(paths.log)}"
              + (f" ({n_bad} malformed rows dead-lettered)" if n_bad else ""), file=sys.stderr)
    elif log.end_offset == 0 and not cfg.train.continuous:
        raise UsageError(f"the event log {storage.where(paths.log)} is empty and no data was given: pass --data")
    sample = pa.concat_tables(list(log.read(0, min(log.end_offset, 10_000)))) if log.end_offset else None
    spec = cfg.feature_spec(None if sample is None else sample.drop_columns([OFFSET]))

    tc = cfg.train
    started = not ray.is_initialized()
    if started:  # a local cluster overcommits logical CPUs: workers and shards mostly wait on each other
        need = tc.workers * tc.cpus_per_worker + tc.shards * tc.cpus_per_shard + 2
        init_ray(max(2, math.ceil(need)), include_dashboard=False)
    # Ctrl-C or SIGTERM (`ray job stop`) ends the stream: the workers write a
    # final checkpoint and return; a second one interrupts at once. Training
    # runs on a thread so that Ray Train's own SIGINT handler (an abort, no
    # checkpoint), which it installs only from the main thread, stays out.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def stop(signum, frame) -> None:
        storage.write_bytes(paths.stop_file, b"")
        print("olrec: stopping after a final checkpoint (again to interrupt)", file=sys.stderr)
        for s, h in previous.items():
            signal.signal(s, h)

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["metrics"] = train(spec, cfg.learner, tc, paths.root)
        except BaseException as e:  # re-raised on the main thread
            result["error"] = e

    for s in signals:
        signal.signal(s, stop)
    try:
        worker = threading.Thread(target=run, name="olrec-train", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)  # short waits: signals are handled between them
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if started:
            ray.shutdown()
    if "error" in result:
        raise result["error"]
    metrics = result["metrics"]
    out = {**metrics, "run_dir": storage.where(paths.root)}
    storage.write_bytes(storage.join(paths.root, "train.json"), (json.dumps(out, indent=2, default=str) + "\n").encode())
    print(json.dumps(out, default=str))
    return out


def run_serve(args: argparse.Namespace) -> None:
    """``olrec serve``: Triton (unless given), Serve with olrec's gRPC services, the app; until Ctrl-C."""
    import math
    import signal
    import threading

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serve.app import SERVICER_FUNCTIONS, application, serve_config

    from .rayenv import init_ray
    from .serving import triton_repo
    from .train import RunPaths

    paths = RunPaths.of(args.run_dir)
    if not storage.is_file(paths.model):
        raise UsageError(f"{storage.where(paths.model)} not found: serve a run that `olrec train` has started (--run-dir)")
    if args.replicas < 1 or not args.replica_cpus > 0:
        raise UsageError(f"--replicas must be >= 1 and --replica-cpus > 0, got {args.replicas}, {args.replica_cpus}")
    opts = {"run_dir": str(paths.root), "scorer": args.scorer, "precision": args.precision}
    triton = None
    if args.scorer == "triton" and not args.triton_url:
        from .triton import RAY_WORKER_NICENESS, TritonServer

        repo = triton_repo(paths.root) / "local"
        repo.mkdir(parents=True, exist_ok=True)
        triton = TritonServer(repo, models=(), niceness=RAY_WORKER_NICENESS).start()  # the app publishes the model
        print(f"olrec: Triton on {triton.url} (log {triton.log_path})", file=sys.stderr)
    if args.triton_url or triton:
        opts["triton_url"] = args.triton_url or triton.url
    cfg = serve_config(opts)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):  # from here on, Ctrl-C means: shut down cleanly
        signal.signal(s, lambda *_: stop.set())
    try:
        init_ray(max(2, math.ceil(args.replicas * args.replica_cpus) + 1), include_dashboard=False)
        serve.start(grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=SERVICER_FUNCTIONS))
        # This machine's Triton reads its model repository from this machine's disk.
        here = ray.util.get_node_ip_address() if triton is not None else None
        serve.run(application(cfg, publisher_node=here, num_replicas=args.replicas,
                              ray_actor_options={"num_cpus": args.replica_cpus}), name="olrec", route_prefix="/olrec")
        if not stop.is_set():
            print(f"olrec: serving {storage.where(paths.root)} on gRPC port {args.port} (Ctrl-C to stop)", file=sys.stderr)
        while not stop.wait(0.5):
            pass
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if triton is not None:
            triton.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            check_local_dir(args.run_dir)
            from .demo import DemoConfig, run_demo

            data = args.data or Path(os.environ.get("OLREC_DATA", DEFAULT_DATA))
            if not data.is_dir():
                raise UsageError(f"MovieLens-100K not found at {data.resolve()}; pass --data /path/to/ml-100k")
            run_demo(DemoConfig(
                data=data, run_dir=Path(args.run_dir), report=args.report, rate=args.rate, max_events=args.max_events,
                duration_s=args.duration, request_rate=args.request_rate, feedback=args.feedback,
                malformed=args.malformed, workers=args.workers, shards=args.shards, replicas=args.replicas,
                port=args.port, scorer=args.scorer, linger_s=args.linger, quiet=args.quiet))
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "train":
            over = _overrides(args)
            if getattr(args, "events", None) is None and os.environ.get("OLREC_DATA"):
                over.setdefault("data", {})["path"] = os.environ["OLREC_DATA"]
            run_train(load_config(args.config, over))
        else:
            run_learn(load_config(args.config, _overrides(args)), quiet=args.quiet)
    except (UsageError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"olrec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
