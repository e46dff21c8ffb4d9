"""The benchmark of issue #8: the bridge side by side with dcmtk and Orthanc.

``python -m bench.run [--quick] [--rounds N] [--out FILE]`` builds its own
studies, runs every phase in alternating rounds (so that a noisy neighbour hurts
both sides of a ratio alike), prints a table of medians and writes every figure
as JSON (default ``bench/results/latest.json``). Phases:

- ``ingest``: dcmtk storescu into the bridge (acknowledged means fsynced and
  recorded) against storescu into dcmtk storescp (one association) and into
  Orthanc; the CT study with one and two associations, the multi-frame study
  at 128 KB PDUs;
- ``e2e``: storescu -> bridge A -> bridge B -> PACS (storescp), from the first
  byte sent to the last instance the PACS acknowledged, against storescu ->
  PACS; the quiet period is taken out and reported apart;
- ``stream``: eight studies sent back to back through the chain, against the
  same to the PACS directly;
- ``stages``: seal, deliver, open and forward alone, each in a fresh process
  running the bridge's own library code (:mod:`bench.stages`), in MB/s;
- ``memory``: the peak resident set of each bridge process for the large
  (multi-frame) study and for a multi-GB study (``--big-gb``; ``--quick`` and
  ``--big-gb 0`` skip it).

Times from inside the chain come from the bridges' own state stores: each job's
creation and completion time (the store tells an idle worker of a new job at
once, so the stage counts the handler's work, not a poll).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

from bench import procs
from bench.studies import Study, make_ct_study, make_large_study, make_multiframe_study

RESULTS = Path(__file__).resolve().parent / "results"
PDU_128K = 131072
BIG_QUIET = 10.0  # seconds; the multi-GB study must go as one envelope
_MB = 1e6

# -- sizes ------------------------------------------------------------------------

FULL = {
    "ct_instances": 400,
    "ct_size": 512,
    "mf_instances": 4,
    "mf_frames": 100,
    "stream_studies": 8,
    "stream_instances": 100,
}
QUICK = {
    "ct_instances": 6,
    "ct_size": 256,
    "mf_instances": 2,
    "mf_frames": 8,
    "stream_studies": 2,
    "stream_instances": 3,
}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / _MB / seconds if seconds > 0 else float("nan")


def _clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


# -- Orthanc ----------------------------------------------------------------------


def _orthanc_installed() -> bool:
    return Path("/usr/sbin/Orthanc").exists() or shutil.which("Orthanc") is not None


def _orthanc_empty(server) -> None:
    """Delete every study from Orthanc, so the next round stores anew."""
    for study in server.get("/studies"):
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/studies/{study}", method="DELETE"
        )
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (loopback)
            resp.read()


# -- waiting on the chain ---------------------------------------------------------


def _wait_forwarded(b: procs.Bridge, instances: int, timeout: float) -> float:
    """Wait until B has stored ``instances`` at the PACS; return when the last
    forward job completed (epoch seconds). Raises on a dead-lettered job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b.daemon.proc.poll() is not None:
            raise RuntimeError(f"bridge B exited: {b.daemon.log_text()[-2000:]}")
        rows = b.query(
            "SELECT state, payload, updated_at FROM jobs WHERE queue = 'forward'"
        )
        if any(r["state"] == "dead" for r in rows):
            raise RuntimeError("a forward job was dead-lettered")
        done = [r for r in rows if r["state"] == "done"]
        if sum(json.loads(r["payload"]).get("delivered", 0) for r in done) >= instances:
            return max(r["updated_at"] for r in done)
        time.sleep(0.05)
    raise TimeoutError(f"the PACS did not get {instances} instances in {timeout:.0f} s")


def _jobs(bridge: procs.Bridge, queue: str) -> list[dict]:
    return [
        dict(r)
        for r in bridge.query(
            "SELECT key, payload, created_at, updated_at FROM jobs "
            "WHERE queue = ? AND state = 'done' ORDER BY created_at",
            (queue,),
        )
    ]


def _chain_records(a: procs.Bridge, b: procs.Bridge) -> dict:
    """Per-study stage times from both stores, keyed by A's study ref."""
    studies = {
        r["ref"]: dict(r)
        for r in a.query(
            "SELECT s.ref, s.sealed_at, s.size_bytes, max(i.received_at) AS last_rx, "
            "min(i.received_at) AS first_rx FROM studies s "
            "JOIN instances i ON i.study_ref = s.ref GROUP BY s.ref"
        )
    }
    envelopes = {
        r["id"]: dict(r)
        for r in a.query(
            "SELECT id, study_ref, size_bytes, details FROM envelopes "
            "WHERE direction = 'out'"
        )
    }
    stage_of = {}
    for job in _jobs(a, "seal"):
        ref = json.loads(job["payload"])["study_ref"]
        stage_of.setdefault(ref, {})["seal"] = job
    env_ref = {e["id"]: e["study_ref"] for e in envelopes.values()}
    for queue, bridge in (("deliver", a), ("open", b), ("forward", b)):
        for job in _jobs(bridge, queue):
            env_id = json.loads(job["payload"])["envelope_id"]
            stage_of.setdefault(env_ref.get(env_id, env_id), {})[queue] = job
    out = {}
    for ref, study in studies.items():
        jobs = stage_of.get(ref, {})
        env = next((e for e in envelopes.values() if e["study_ref"] == ref), None)
        record = {
            "bytes": study["size_bytes"],
            "first_rx": study["first_rx"],
            "last_rx": study["last_rx"],
            "sealed_at": study["sealed_at"],
            "quiet": study["sealed_at"] - study["last_rx"],
            "envelope_bytes": env["size_bytes"] if env else None,
            "pack_seconds": json.loads(env["details"]).get("pack_seconds")
            if env
            else None,
        }
        for stage in ("seal", "deliver", "open", "forward"):
            job = jobs.get(stage)
            record[stage] = job["updated_at"] - job["created_at"] if job else None
            record[f"{stage}_done"] = job["updated_at"] if job else None
        out[ref] = record
    return out


# -- phases ------------------------------------------------------------------------


def phase_ingest(work: Path, ct: Study, mf: Study, rounds: int) -> dict:
    """storescu into storescp, the bridge and Orthanc, alternating the order."""
    orthanc = None
    if _orthanc_installed():
        from tests.support.orthanc import Orthanc

        orthanc = Orthanc(work / "orthanc")
    samples: dict[str, list] = {}

    def add(key: str, value) -> None:
        samples.setdefault(key, []).append(value)

    def to_storescp(study: Study, associations: int = 1, pdu: int | None = None):
        scp = procs.StoreSCP(work / "scp-in", pdu=pdu)
        try:
            return procs.storescu(
                scp.port,
                list(study.files),
                called="PACS",
                associations=associations,
                pdu=pdu,
            )
        finally:
            scp.stop()
            _clear(work / "scp-in")

    def to_bridge(study: Study, associations: int = 1, pdu: int | None = None):
        root = work / "ingest-bridge"
        bridge = procs.start_receiver_only(root)
        add("bridge_idle_peak_rss_mib", bridge.peak_rss_mib())
        try:
            seconds = procs.storescu(
                bridge.dicom_port,
                list(study.files),
                called="JMIXBRIDGE",
                associations=associations,
                pdu=pdu,
            )
            count = bridge.query("SELECT count(*) FROM instances")[0][0]
            if count != study.instances:
                raise RuntimeError(f"bridge recorded {count} of {study.instances}")
            return seconds, bridge.peak_rss_mib(), bridge.cpu_seconds()
        finally:
            bridge.stop()
            shutil.rmtree(root, ignore_errors=True)

    def to_orthanc(study: Study):
        seconds = procs.storescu(
            orthanc.dicom_port, list(study.files), called="ORTHANC"
        )
        _orthanc_empty(orthanc)
        return seconds

    try:
        for rnd in range(rounds):
            steps = [
                ("ct_storescp_1", lambda: to_storescp(ct)),
                ("ct_storescp_2", lambda: to_storescp(ct, 2)),
                ("ct_bridge_1", lambda: to_bridge(ct)),
                ("ct_bridge_2", lambda: to_bridge(ct, 2)),
                ("mf_storescp", lambda: to_storescp(mf, pdu=PDU_128K)),
                ("mf_bridge", lambda: to_bridge(mf, pdu=PDU_128K)),
            ]
            if orthanc is not None:
                steps.append(("ct_orthanc", lambda: to_orthanc(ct)))
            if rnd % 2:
                steps.reverse()
            for key, step in steps:
                got = step()
                if isinstance(got, tuple):
                    seconds, peak, cpu = got
                    add(f"{key}_peak_rss_mib", peak)
                    add(f"{key}_cpu_seconds", cpu)
                else:
                    seconds = got
                add(key, seconds)
                _progress(f"ingest round {rnd + 1} {key}: {seconds:.2f} s")
    finally:
        if orthanc is not None:
            orthanc.stop()

    med = {k: _median(v) for k, v in samples.items()}
    base = med["ct_storescp_1"]
    result = {
        "ct_bytes": ct.bytes,
        "mf_bytes": mf.bytes,
        "samples_seconds": samples,
        "mb_per_s": {
            k: _rate(ct.bytes if k.startswith("ct") else mf.bytes, v)
            for k, v in med.items()
            if not k.endswith(("_mib", "_seconds"))
        },
        "ratio_ct_1_vs_storescp": base / med["ct_bridge_1"],
        "ratio_ct_2_vs_storescp": base / med["ct_bridge_2"],
        "ratio_storescp_2_vs_1": base / med["ct_storescp_2"],
        "ratio_mf_vs_storescp_128k": med["mf_storescp"] / med["mf_bridge"],
        "ratio_ct_vs_orthanc": (
            med["ct_orthanc"] / med["ct_bridge_1"] if "ct_orthanc" in med else None
        ),
        "ratio_orthanc_vs_storescp": (
            base / med["ct_orthanc"] if "ct_orthanc" in med else None
        ),
        "bridge_peak_rss_mib_ct": med["ct_bridge_1_peak_rss_mib"],
        "bridge_peak_rss_mib_mf": med["mf_bridge_peak_rss_mib"],
        "bridge_idle_peak_rss_mib": med["bridge_idle_peak_rss_mib"],
    }
    return result


def _chain_round(
    work: Path, studies: list[Study], pacs: procs.StoreSCP, quiet: float
) -> dict:
    """Send ``studies`` back to back through A and B into ``pacs``; return figures."""
    root = work / "chain"
    a, b = procs.start_pair(root, pacs.port, quiet_seconds=quiet)
    try:
        cpu_a, cpu_b = a.cpu_seconds(), b.cpu_seconds()
        started = time.time()
        ingest = sum(
            procs.storescu(a.dicom_port, list(s.files), called="JMIXBRIDGE")
            for s in studies
        )
        total_instances = sum(s.instances for s in studies)
        timeout = 120 + sum(s.bytes for s in studies) / 5e6
        ended = _wait_forwarded(b, total_instances, timeout)
        cpu = {"a": a.cpu_seconds() - cpu_a, "b": b.cpu_seconds() - cpu_b}
        peak = {"a": a.peak_rss_mib(), "b": b.peak_rss_mib()}
        records = _chain_records(a, b)
        # A forward association lost midway costs a DIMSE timeout before the
        # rest is resent; pynetdicom 3.0.4's swallowed C-STORE response did this
        # until the forwarder kept responses from its reactor (issue #8).
        stalls = b.daemon.log_text().count("association lost")
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)
        _clear(pacs.folder)
    last = max(records.values(), key=lambda r: r["last_rx"])
    nbytes = sum(s.bytes for s in studies)
    wall = ended - started
    return {
        "bytes": nbytes,
        "ingest_seconds": ingest,
        "wall_seconds": wall,
        "quiet_seconds": last["quiet"],
        "wall_excl_quiet_seconds": wall - last["quiet"],
        "cpu_seconds": cpu,
        "cpu_seconds_per_gb": (cpu["a"] + cpu["b"]) / (nbytes / 1e9),
        "peak_rss_mib": peak,
        "studies": list(records.values()),
        "envelopes": len(records),
        "forward_stalls": stalls,
    }


def _direct_round(studies: list[Study], pacs: procs.StoreSCP) -> float:
    seconds = sum(
        procs.storescu(pacs.port, list(s.files), called="PACS") for s in studies
    )
    _clear(pacs.folder)
    return seconds


def phase_e2e(
    work: Path, studies: list[Study], rounds: int, quiet: float, label: str
) -> dict:
    """Alternate the chain and the direct path; medians and the stage split."""
    pacs = procs.StoreSCP(work / "pacs")
    chains, directs = [], []
    try:
        for rnd in range(rounds):
            order = ("direct", "chain") if rnd % 2 == 0 else ("chain", "direct")
            for which in order:
                if which == "direct":
                    directs.append(_direct_round(studies, pacs))
                    _progress(f"{label} round {rnd + 1} direct: {directs[-1]:.2f} s")
                else:
                    chains.append(_chain_round(work, studies, pacs, quiet))
                    _progress(
                        f"{label} round {rnd + 1} chain: "
                        f"{chains[-1]['wall_seconds']:.2f} s "
                        f"(quiet {chains[-1]['quiet_seconds']:.2f} s)"
                    )
    finally:
        pacs.stop()

    nbytes = chains[0]["bytes"]
    direct = _median(directs)
    wall = _median([c["wall_excl_quiet_seconds"] for c in chains])
    stage_med = {}
    for stage in ("seal", "deliver", "open", "forward"):
        per_round = [sum(s[stage] or 0 for s in c["studies"]) for c in chains]
        stage_med[stage] = _median(per_round)
    stage_med["ingest"] = _median([c["ingest_seconds"] for c in chains])
    shares = [
        sum(
            (s["seal"] or 0) + (s["deliver"] or 0) + (s["open"] or 0)
            for s in c["studies"]
        )
        / c["wall_excl_quiet_seconds"]
        for c in chains
    ]
    return {
        "bytes": nbytes,
        "studies": len(studies),
        "direct_seconds": directs,
        "chain": chains,
        "direct_median_seconds": direct,
        "chain_median_seconds_excl_quiet": wall,
        "chain_median_seconds_incl_quiet": _median([c["wall_seconds"] for c in chains]),
        "quiet_median_seconds": _median([c["quiet_seconds"] for c in chains]),
        "ratio_vs_direct": direct / wall,
        "ratio_vs_direct_incl_quiet": direct
        / _median([c["wall_seconds"] for c in chains]),
        "stage_seconds": stage_med,
        "stage_mb_per_s": {k: _rate(nbytes, v) for k, v in stage_med.items() if v},
        "seal_ship_open_share": _median(shares),
        "forward_stalls": [c["forward_stalls"] for c in chains],
        "cpu_seconds_per_gb": _median([c["cpu_seconds_per_gb"] for c in chains]),
        "cpu_seconds": {
            k: _median([c["cpu_seconds"][k] for c in chains]) for k in ("a", "b")
        },
        "peak_rss_mib": {
            k: max(c["peak_rss_mib"][k] for c in chains) for k in ("a", "b")
        },
    }


def phase_stages(work: Path, ct: Study, rounds: int) -> dict:
    """Seal, deliver, open and forward alone, each in a fresh process."""
    samples: dict[str, list] = {}
    pacs = procs.StoreSCP(work / "stage-pacs")
    try:
        for rnd in range(rounds):
            root = work / "stages"
            a, b = procs.start_pair(root, pacs.port, quiet_seconds=3600)
            env = root / "env.zip"
            try:
                samples.setdefault("seal", []).append(
                    _stage(
                        "pack", ct.folder, env, root / "a" / "keys", root / "b" / "keys"
                    )
                )
                samples.setdefault("deliver", []).append(
                    _stage("deliver", env, f"http://127.0.0.1:{b.http_port}", a.token)
                )
            finally:
                a.stop()
                b.stop()
            samples.setdefault("open", []).append(
                _stage(
                    "open", env, root / "out", root / "b" / "keys", root / "a" / "keys"
                )
            )
            samples.setdefault("forward", []).append(
                _stage("forward", root / "out" / "dicom", pacs.port, "PACS")
            )
            shutil.rmtree(root, ignore_errors=True)
            _clear(pacs.folder)
            _progress(
                f"stages round {rnd + 1}: "
                + ", ".join(f"{k} {v[-1]['seconds']:.2f} s" for k, v in samples.items())
            )
    finally:
        pacs.stop()
    return {
        stage: {
            "seconds": _median([s["seconds"] for s in got]),
            "mb_per_s": _median([_rate(s["bytes"], s["seconds"]) for s in got]),
            "peak_rss_mib": max(s["peak_rss_mib"] for s in got),
            "cpu_seconds_per_gb": _median(
                [s["cpu_seconds"] / (s["bytes"] / 1e9) for s in got]
            ),
            "samples": got,
        }
        for stage, got in samples.items()
    }


def _stage(verb: str, *args) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.stages", verb, *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the machine and the report ---------------------------------------------------


def machine() -> dict:
    """Describe the machine and the software the run used."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    versions = {}
    for dist in ("pynetdicom", "pydicom", "cryptography", "aiohttp", "httpx", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    dcmtk = subprocess.run(
        ["/usr/bin/storescu", "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    versions["dcmtk"] = dcmtk.strip()
    if _orthanc_installed():
        from tests.support.orthanc import orthanc_version

        versions["orthanc"] = orthanc_version()
    versions["python"] = platform.python_version()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "versions": versions,
    }


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: dict) -> str:
    """Return the results as a Markdown table of figures against targets."""
    ing, e2e, stream = results["ingest"], results["e2e"], results["stream"]
    stages, mem = results["stages"], results["memory"]
    rows = [
        (
            "ingest CT, 1 association, / storescp",
            ing["ratio_ct_1_vs_storescp"],
            ">= 0.35",
        ),
        (
            "ingest CT, 2 associations, / storescp",
            ing["ratio_ct_2_vs_storescp"],
            ">= 0.5",
        ),
        ("ingest CT, 1 association, / Orthanc", ing["ratio_ct_vs_orthanc"], ">= 1.4"),
        (
            "ingest multi-frame, 128 KB PDU, / storescp",
            ing["ratio_mf_vs_storescp_128k"],
            ">= 0.85",
        ),
        ("(storescp 2 associations / 1)", ing["ratio_storescp_2_vs_1"], ""),
        ("(Orthanc / storescp)", ing["ratio_orthanc_vs_storescp"], ""),
        (
            "one study end to end / direct (quiet excluded)",
            e2e["ratio_vs_direct"],
            ">= 0.12",
        ),
        ("  last instance to seal, s", e2e["quiet_median_seconds"], "apart"),
        ("  end to end incl. quiet / direct", e2e["ratio_vs_direct_incl_quiet"], ""),
        ("  seal + ship + open share of wall", e2e["seal_ship_open_share"], "< 0.25"),
        (
            "stream of studies / direct (last quiet excluded)",
            stream["ratio_vs_direct"],
            ">= 0.25",
        ),
        (
            "  stream incl. last quiet / direct",
            stream["ratio_vs_direct_incl_quiet"],
            "",
        ),
    ]
    lines = [
        "| measure | result | target |",
        "| --- | --- | --- |",
        *(f"| {name} | {_fmt(value)} | {target} |" for name, value, target in rows),
    ]
    lines += [
        "",
        "| stage | alone, MB/s | in the chain, MB/s | CPU s/GB alone |",
        "| --- | --- | --- | --- |",
    ]
    lines.append(
        f"| ingest (storescu -> A) | {_fmt(ing['mb_per_s']['ct_bridge_1'], 0)} | "
        f"{_fmt(e2e['stage_mb_per_s'].get('ingest'), 0)} | - |"
    )
    for stage in ("seal", "deliver", "open", "forward"):
        alone = stages.get(stage, {})
        lines.append(
            f"| {stage} | {_fmt(alone.get('mb_per_s'), 0)} | "
            f"{_fmt(e2e['stage_mb_per_s'].get(stage), 0)} | "
            f"{_fmt(alone.get('cpu_seconds_per_gb'), 1)} |"
        )
    lines += [
        "",
        "| process peak RSS (VmHWM), MiB | result | target |",
        "| --- | --- | --- |",
        f"| A idle, just started | {_fmt(ing['bridge_idle_peak_rss_mib'], 0)} | |",
        f"| A receiving the CT study | {_fmt(ing['bridge_peak_rss_mib_ct'], 0)} | |",
        f"| A receiving multi-frame (~52 MB instances) | "
        f"{_fmt(ing['bridge_peak_rss_mib_mf'], 0)} | < 80 |",
    ]
    for key, label in (("large", "multi-frame study"), ("big", "multi-GB study")):
        got = mem.get(key)
        if got:
            size = f"{got['bytes'] / 1e9:.2f} GB" if key == "big" else "large"
            for proc in ("a", "b"):
                peak = _fmt(got["peak_rss_mib"][proc], 0)
                lines.append(
                    f"| {proc.upper()}, {label} ({size}) end to end | {peak} | < 200 |"
                )
    lines += [
        "",
        f"CPU seconds per GB through both bridges (CT study, end to end): "
        f"A {_fmt(e2e['cpu_seconds']['a'] / (e2e['bytes'] / 1e9), 1)}, "
        f"B {_fmt(e2e['cpu_seconds']['b'] / (e2e['bytes'] / 1e9), 1)}, "
        f"together {_fmt(e2e['cpu_seconds_per_gb'], 1)}.",
    ]
    return "\n".join(lines)


def _progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Build the studies, run every phase, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny studies, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument(
        "--big-gb", type=float, default=2.5, help="multi-GB study size; 0 skips it"
    )
    parser.add_argument(
        "--quiet", type=float, default=0.5, help="the route's quiet period, seconds"
    )
    parser.add_argument("--workdir", help="where to build studies (needs ~3x --big-gb)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    big_bytes = 0 if args.quick else int(args.big_gb * 1e9)

    work = Path(tempfile.mkdtemp(prefix="jmix-bench-", dir=args.workdir))
    started = time.time()
    try:
        _progress(f"building studies in {work}")
        ct = make_ct_study(work / "ct", sizes["ct_instances"], sizes["ct_size"])
        mf = make_multiframe_study(
            work / "mf", sizes["mf_instances"], sizes["mf_frames"]
        )
        stream = [
            make_ct_study(
                work / f"stream-{i}",
                sizes["stream_instances"],
                sizes["ct_size"],
                seed=10 + i,
            )
            for i in range(sizes["stream_studies"])
        ]
        results = {
            "machine": machine(),
            "settings": {
                **sizes,
                "rounds": rounds,
                "quiet_seconds": args.quiet,
                "quick": args.quick,
                "big_bytes": big_bytes,
            },
            "ingest": phase_ingest(work, ct, mf, rounds),
            "e2e": phase_e2e(work, [ct], rounds, args.quiet, "e2e"),
            "stream": phase_e2e(work, stream, rounds, args.quiet, "stream"),
            "stages": phase_stages(work, ct, rounds),
            "memory": {"large": phase_e2e(work, [mf], 1, args.quiet, "large")},
        }
        if big_bytes:
            big = make_large_study(work / "big", big_bytes)
            # One envelope is the point of this phase: 52 MB instances arrive
            # seconds apart, so a short quiet period would split the study.
            results["memory"]["big"] = phase_e2e(
                work, [big], 1, max(args.quiet, BIG_QUIET), "big"
            )
            shutil.rmtree(big.folder, ignore_errors=True)
        results["seconds"] = time.time() - started
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print(table(results))
    print(f"\nresults written to {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
