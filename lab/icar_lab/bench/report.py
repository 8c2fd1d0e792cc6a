"""The benchmark's outputs: `<UTC>.json` + `latest.json` (everything measured), `latest.md` (the
answers first, then one table per section) and PNG plots, all in one directory."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from icar_lab.plots import pyplot


def _fmt(value: float | None, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _speed_answer(emb: dict[str, Any]) -> str:
    """The shipped router's speedup at the quality the frontier measured on the test split, or, without
    that quality, the fastest point's speed alone."""
    eq = emb.get("equal_quality")
    if not eq:
        best = max(
            (p for p in emb["points"] if p["kind"] != "baseline" and p["name"] != "full"),
            key=lambda p: p["speedup"]["median"],
        )
        note = emb["quality_note"] or "no frontier quality"
        return (
            f"unknown at equal quality ({note}); speed alone: fastest point `{best['name']}` "
            f"{best['speedup']['median']:.2f}x vs encode_image"
        )
    s = eq["speedup"]
    own = next(p for p in emb["points"] if p["name"] == eq["point"])["speedup_vs_full_route"]
    verdict = "meets" if eq["meets"] else "MISSES"
    return (
        f"the shipped router (chosen on the calib split) runs {s['median']:.2f}x faster than open_clip "
        f"encode_image on {emb['model']} (round spread {s['min']:.2f}-{s['max']:.2f}x; "
        f"{_fmt(own and own['median'])}x vs our own full-depth forward) at t2i R@10 {eq['t2i_R@10']:.4f} "
        f"on the test split, {eq['recall_ratio']:.3f} of full depth's: it {verdict} {eq['rule']}"
    )


def _query_answer(query: dict[str, Any]) -> str:
    q = {t["dtype"]: t for t in query["tables"]}
    shipped = "; ".join(
        f"{d}: p50 {t['settings']['shipped']['latency_ms']['p50']:.1f} ms, "
        f"p99 {t['settings']['shipped']['latency_ms']['p99']:.1f} ms, "
        f"recall@10 {t['settings']['shipped']['recall@10']:.3f} (with {t['with_unindexed_rows']['rows']:,} "
        f"unindexed rows appended: p50 {t['with_unindexed_rows']['latency_ms']['p50']:.1f} ms)"
        for d, t in q.items()
    )
    return (
        f"Queries on {query['rows']:,} x {query['dim']}-d clustered vectors with the shipped "
        f"index and the search settings `icar build-index` tuned on each table "
        f"({'; '.join(f'{d}: ' + _settings(t['shipped_search']) for d, t in q.items())}): {shipped}."
    )


def answers(r: dict[str, Any]) -> dict[str, str]:
    """The questions the summary must answer, each in one sentence with its numbers."""
    emb = r["encoder"][0]
    peak = r["machine"]["peak_gflops"]
    fractions = ", ".join(f"{e['model']} {e['points'][0]['fraction_of_peak']:.0%}" for e in r["encoder"])
    adaptive = [p["fraction_of_peak"] for p in emb["points"] if p["kind"] != "baseline"]
    p = r["pipeline"]
    rate = p["steady_images_per_second"] or p["end_to_end_images_per_second"]
    load, abuse = r["serve"]["load"], r["serve"]["abuse"]
    return {
        "adaptive_vs_full": f"Adaptive vs full at equal quality: {_speed_answer(emb)}.",
        "matmul_peak": (
            f"Full-depth encode_image reaches this share of the measured {peak:.0f} GFLOP/s fp32 matmul peak "
            f"(multiply-add = 2 FLOPs): {fractions}; the adaptive points on {emb['model']} reach "
            f"{min(adaptive):.0%}-{max(adaptive):.0%}."
        ),
        "pipeline": (
            f"The Ray job runs at {rate:.1f} images/s ({p['reported_rate']} rate), "
            f"{p['share_of_bound']:.0%} of the {p['bound_images_per_second']:.1f} images/s that "
            f"{p['num_cpus']} cores allow at {p['cpu_ms_per_image']['prepare']:.2f} CPU-ms/image to prepare "
            f"and {p['cpu_ms_per_image']['encode']:.2f} to encode."
        ),
        "query": _query_answer(r["query"]),
        "serve": (
            f"`icar serve` over HTTP on 127.0.0.1, {load['clients']} clients for {load['seconds']:.0f} s "
            f"of text queries (k=10, model forward included): p50 {load['p50_ms']:.1f} ms, p99 "
            f"{load['p99_ms']:.1f} ms, {load['requests_per_second']:.0f} requests/s, "
            f"{load['errors']} errors; "
            f"abuse: {abuse['as_expected']} of {abuse['cases']} injection, malformed and oversized requests "
            "answered as expected, nothing leaked."
        ),
    }


def _settings(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "LanceDB's defaults"


def _encoder_md(e: dict[str, Any]) -> list[str]:
    lines = [
        f"**{e['model']}** ({e['weights']} weights; heads: {e['heads']}), {e['images']} images at "
        f"{e['image_size']} px, batch {e['batch_size']}, {e['rounds']} alternating rounds, "
        f"{e['threads']} threads",
        "",
        "| point | images/s median (min-max) | speedup vs encode_image | vs own full | GFLOPs/img "
        "| achieved GFLOP/s | of peak | t2i R@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in e["points"]:
        s, v = p["images_per_second"], p["speedup"]
        lines.append(
            f"| {p['name']} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | {v['median']:.2f}x "
            f"({v['min']:.2f}-{v['max']:.2f}) | {_fmt((p['speedup_vs_full_route'] or {}).get('median'))}x "
            f"| {p['gflops_per_image']:.3f} | {p['achieved_gflops']:.1f} "
            f"| {p['fraction_of_peak']:.0%} | {_fmt(p.get('t2i_R@10'), '.4f')} |"
        )
    if e.get("routed_share"):
        lines.append(f"\nrouted share: {', '.join(f'{k} {v:.0%}' for k, v in e['routed_share'].items())}")
    if e.get("quality_source") is not None or e.get("quality_note"):
        lines.append(
            f"\nquality from {e.get('quality_source')} (not recomputed). {e.get('quality_note', '')}"
        )
    return lines + [""]


def _header(r: dict[str, Any]) -> list[str]:
    h = r["host"]
    return [
        f"# Benchmark ({r['mode']}) — {r['started_utc']}",
        "",
        f"{h['cpu_count']} CPUs, {h['threads']} torch threads, torch {h['torch']}, Python {h['python']}; "
        f"load average at start {h['load_average_start'][0]:.2f}, at end {h['load_average_end'][0]:.2f}; "
        f"suite took {r['seconds']:.0f} s. Command: `python jobs/bench.py"
        f"{'' if r['mode'] == 'full' else ' --' + r['mode']}`.",
        "",
        "## Answers",
        "",
        *[f"- {text}" for text in r["answers"].values()],
        "",
    ]


def _encoder_section(encoders: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 1. Encoder speed (alternating A B A B… in one process, same images and threads)",
        "",
        "Speedups are medians of same-round ratios. `full` is the adaptive forward at full depth with no "
        "reduction (same output as encode_image): its ratio to encode_image is the implementation alone "
        "(fused attention, own block loop); the *vs own full* column isolates the work the route saves. "
        "`routed` is the calibrated router (routing itself is timed in section 4). GFLOPs/img are the "
        "encoder's analytic counts (pipeline/encode/flops.py).",
        "",
    ]
    for e in encoders:
        lines += _encoder_md(e)
    return [*lines, "![encoder](encoder.png)", ""]


def _machine_section(m: dict[str, Any]) -> list[str]:
    return [
        "## 2. Machine limit",
        "",
        f"fp32 matmul {m['size']}x{m['size']}, {m['threads']} threads: peak {m['peak_gflops']:.1f} GFLOP/s "
        f"(median {m['median_gflops']:.1f}). Convention: {m['convention']}. Achieved = the encoder's own "
        "analytic GFLOPs/image x median images/s (tables above).",
        "",
    ]


def _pipeline_section(p: dict[str, Any]) -> list[str]:
    return [
        "## 3. Pipeline efficiency (`run_index`, local Ray)",
        "",
        f"{p['images']} generated scenes in {p['shards']} shards, Ray num_cpus={p['num_cpus']}, router: "
        f"{p['config']}, {p['encoder']['actors']} encoder actors x {p['encoder']['cpus_per_actor']:g} CPU, "
        f"batch {p['encoder']['batch_size']}; routes {p['routes']}.",
        "",
        "Bound = cores / (prepare + encode CPU s/image), each measured alone on one core on the same "
        "images (prepare = read + decode + score + route, as the job runs it; encode = the job's encoder, "
        "1 torch thread, the job's batch size).",
        "",
        "| rate | images/s |",
        "|---|---|",
        f"| Ray start-up (separate) | {_fmt(p['ray_start_s'], '.1f')} s |",
        f"| pipeline end to end (run_index incl. actor start-up; {p['run_seconds']:.1f} s) "
        f"| {p['end_to_end_images_per_second']:.1f} |",
        f"| pipeline steady state (a longer run's extra rows / its extra seconds) "
        f"| {_fmt(p['steady_images_per_second'], '.1f')} |",
        f"| bound ({p['num_cpus']} cores / ({p['cpu_ms_per_image']['prepare']:.2f} + "
        f"{p['cpu_ms_per_image']['encode']:.2f} CPU-ms/image)) | {p['bound_images_per_second']:.1f} |",
        "",
        f"Steady state: {p['steady_note']}. Reported ({p['reported_rate']}): **{p['share_of_bound']:.0%}** "
        "of the bound.",
        "",
        "| stage (inside the job) | busy ms/image, summed over workers |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in p["busy_ms_per_image"].items()],
        "",
        "![pipeline](pipeline.png)",
        "",
    ]


def _router_section(rt: dict[str, Any]) -> list[str]:
    return [
        "## 4. Router cost",
        "",
        f"{rt['images']} images at {rt['image_size']} px, scorer `{rt['scorer']}`: complexity features + "
        f"scorer {1e6 * rt['router_cpu_s_per_image']:.0f} CPU-µs/image vs the encoder "
        f"{1e3 * rt['encoder_cpu_s_per_image']:.2f} CPU-ms/image "
        f"(**{rt['router_share_of_encoder_cpu']:.1%}** of the encoder's CPU time).",
        "",
    ]


def _query_rows(t: dict[str, Any]) -> list[str]:
    """One table's rows: each setting, the shipped one with unindexed rows appended, the exact scan."""
    i = t["index"]
    idx = (
        f"IVF_PQ {i['num_partitions']} part., {i['num_sub_vectors']} sub-vec., "
        f"k-means {i['max_iterations']} it."
    )
    lines = [
        f"| {t['dtype']} | {idx} | {t['index_build_s']:.1f} | {t['data_bytes'] / 1e6:.0f} "
        f"| {t['index_bytes'] / 1e6:.1f} | {name} | {s['latency_ms']['p50']:.1f} "
        f"| {s['latency_ms']['p99']:.1f} | {s['recall@10']:.3f} |"
        for name, s in t["settings"].items()
    ]
    u = t["with_unindexed_rows"]
    lines.append(
        f"| {t['dtype']} | same, then {u['rows']:,} rows appended, not indexed | | | | shipped "
        f"| {u['latency_ms']['p50']:.1f} | {u['latency_ms']['p99']:.1f} | {u['recall@10']:.3f} |"
    )
    if f := t["flat_scan"]:
        lines.append(
            f"| {t['dtype']} | none (use_index=False) | | | | exact scan | "
            f"{f['latency_ms']['p50']:.1f} | {f['latency_ms']['p99']:.1f} | {f['recall@10']:.3f} |"
        )
    return lines


def _query_section(q: dict[str, Any]) -> list[str]:
    contrast = "; ".join(
        f"{t['dtype']}: exact top-1 cosine {t['exact_cosine']['top1']:.3f}, "
        f"top-10 {t['exact_cosine']['top10']:.3f}"
        for t in q["tables"]
    )
    return [
        "## 5. Query (LanceDB)",
        "",
        f"{q['rows']:,} rows x {q['dim']}-d, {q['queries']} queries, k={q['k']}; vectors: {q['vectors']}; "
        f"exact: {q['exact']}; lancedb {q['lancedb']}. Every setting runs through `pipeline.query.nearest` "
        "on the Lance dataset and is timed by `pipeline.query.measure_search`: `shipped` is what "
        "`icar query` and `icar serve` run (the settings `icar build-index` tuned on the table for "
        "recall@10 0.95), `default` LanceDB's own knobs.",
        "",
        "| dtype | index | build s | data MB | index MB | settings | p50 ms | p99 ms | recall@10 |",
        "|---|---|---|---|---|---|---|---|---|",
        *[row for t in q["tables"] for row in _query_rows(t)],
        "",
        f"Neighbour contrast (mean over queries) — {contrast}.",
        "",
        "![query](query.png)",
        "",
    ]


def _serve_section(sv: dict[str, Any]) -> list[str]:
    sl, failures = sv["load"], sv["abuse"]["failures"]
    return [
        "## 6. Serving (`icar serve`, real HTTP on 127.0.0.1)",
        "",
        f"The pipeline section's table ({sv['rows']} rows); the server is its own process, each client a "
        "thread with one keep-alive connection sending text queries (k=10) back to back; a request's time "
        "includes the text tower's forward pass and the vector search.",
        "",
        "| clients | seconds | requests | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
        f"| {sl['clients']} | {sl['seconds']:.1f} | {sl['requests']} | {sl['requests_per_second']:.1f} "
        f"| {sl['p50_ms']:.1f} | {sl['p99_ms']:.1f} | {sl['errors']} |",
        "",
        f"Abuse: {sv['abuse']['as_expected']} of {sv['abuse']['cases']} cases answered as expected "
        "(`abuse_cases` in lab/icar_lab/bench/serve_load.py: filter injection in every field, filter text, "
        "bad JSON, image URLs, oversized JSON bodies and uploads, non-image uploads, a decompression bomb, "
        "a foreign Host)"
        + "".join(f"; FAILED {f['case']}: {f['status']}, expected {f['expected']}" for f in failures)
        + ".",
        "",
    ]


def markdown(r: dict[str, Any]) -> str:
    """The answers first, then one section per measurement, numbered as the suite logs them."""
    sections = [
        _header(r),
        _encoder_section(r["encoder"]),
        _machine_section(r["machine"]),
        _pipeline_section(r["pipeline"]),
        _router_section(r["router"]),
        _query_section(r["query"]),
        _serve_section(r["serve"]),
    ]
    return "\n".join(line for section in sections for line in section)


def _encoder_plot(plt: Any, encoders: list[dict[str, Any]], path: Path) -> None:
    """Images/s per point, the round spread as error bars, the speedup written beside each bar."""
    fig, axes = plt.subplots(1, len(encoders), figsize=(5 * len(encoders), 4), squeeze=False)
    for ax, e in zip(axes[0], encoders, strict=True):
        names = [p["name"] for p in e["points"]]
        med = [p["images_per_second"]["median"] for p in e["points"]]
        err = [
            [m - p["images_per_second"]["min"] for m, p in zip(med, e["points"], strict=True)],
            [p["images_per_second"]["max"] - m for m, p in zip(med, e["points"], strict=True)],
        ]
        colours = ["grey" if p["kind"] == "baseline" else "tab:blue" for p in e["points"]]
        ax.barh(names, med, xerr=err, color=colours)
        for y, p in enumerate(e["points"]):
            ax.annotate(f" {p['speedup']['median']:.2f}x", (med[y], y), va="center", fontsize=8)
        ax.set(title=f"{e['model']} ({e['weights'].split(' ')[0]})", xlabel="images/s (median, min-max)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pipeline_plot(plt: Any, p: dict[str, Any], path: Path) -> None:
    """The job's rates against its bound, and where the job spends its CPU."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rates = {"bound": p["bound_images_per_second"], "end to end": p["end_to_end_images_per_second"]}
    if p["steady_images_per_second"]:
        rates["steady"] = p["steady_images_per_second"]
    left.bar(list(rates), list(rates.values()), color=["grey"] + ["tab:blue"] * (len(rates) - 1))
    left.set(ylabel="images/s", title=f"pipeline: {p['share_of_bound']:.0%} of the bound")
    stages = p["busy_ms_per_image"]
    right.bar(list(stages), list(stages.values()), color="tab:orange")
    right.set(ylabel="busy ms / image (summed over workers)", title="where the job spends its CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _query_plot(plt: Any, q: dict[str, Any], path: Path) -> None:
    """p50 and p99 latency per table and setting, its recall@10 written above."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, p50, p99, recall = [], [], [], []
    for t in q["tables"]:
        for name, s in t["settings"].items():
            labels.append(f"{t['dtype']}\n{name}")
            p50.append(s["latency_ms"]["p50"])
            p99.append(s["latency_ms"]["p99"])
            recall.append(s["recall@10"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    for x, rec, top in zip(xs, recall, p99, strict=True):
        ax.annotate(f"R@10 {rec:.2f}", (x, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(ylabel="ms / query", title=f"LanceDB IVF_PQ, {q['rows']:,} x {q['dim']}-d")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plots(r: dict[str, Any], out: Path) -> None:
    """encoder.png, pipeline.png, query.png."""
    plt = pyplot()
    _encoder_plot(plt, r["encoder"], out / "encoder.png")
    _pipeline_plot(plt, r["pipeline"], out / "pipeline.png")
    _query_plot(plt, r["query"], out / "query.png")


def write(r: dict[str, Any], out_dir: Path, started: datetime) -> Path:
    """Write every output; returns the timestamped JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamped = out / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    stamped.write_text(json.dumps(r, indent=2, default=float))
    shutil.copyfile(stamped, out / "latest.json")
    (out / "latest.md").write_text(markdown(r))
    plots(r, out)
    return stamped
