"""What the CLI prints for people: sizes, inspections, the model families, verification reports."""

from __future__ import annotations

from typing import Any


def human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return str(n)


def print_inspect(info: dict[str, Any]) -> None:
    q = info["quantization"]
    conv = info["conversion"]
    print(f"source        {info['source']}")
    print(f"format        {info['format']}  adapter {info['adapter']}  layout {info['layout']}")
    print(f"detection     {info['detection']}")
    print(
        f"quantization  {q['format']}: {', '.join(q['schemes']) or 'none'}  activation "
        f"{q['activation_scheme'] or '-'}  ({q['quantized_tensors']} quantized tensors)"
    )
    for g in q["groups"]:
        print(
            f"{'':<14}{g['group']}: weights {g['weights']}, input activations {g['input_activations'] or '-'}"
        )
    outs = [
        f"{name} (keep{'' if o['keep'] else ' impossible'}; {', '.join(o['quantize']) or 'no fresh scales'})"
        for name, o in q["output_formats"].items()
    ]
    print(f"output        --format {' or '.join(outs)}")
    print(f"shards        {info['shards']}  tensors {info['tensors']}  bytes {human(info['bytes'])}")
    print(
        f"would write   --to {conv['to']} ({conv['dtype']}): {human(conv['output_bytes'])} on disk "
        f"(needs {human(conv['disk_bytes_needed'])} free), peak memory about {human(conv['peak_host_memory_bytes'])}"
    )


def print_adapters(families: list[dict[str, Any]]) -> None:
    for f in families:
        print(f"{f['name']:<14}{f['description']}")
        print(f"{'':<14}detected by {f['detection']}")
        if f["expert_keys"]:
            print(f"{'':<14}experts {', '.join(f['expert_keys'])}")


def print_report(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(
        f"{report['direction']} with {report['adapter']}: "
        f"{'PASSED' if s['passed'] else 'FAILED' if s['verified'] else 'NOT VERIFIED'}"
    )
    print(
        f"  tensors checked {s['tensors_checked']}, bitwise equal {s['bitwise_equal']}, "
        f"bounded {s['bounded_within']}/{s['bounded']}"
        + (
            f" (worst {s['worst_bound_ratio']:.2f} of the bound, min SNR {s['min_snr_db']:.1f} dB)"
            if s["bounded"]
            else ""
        )
    )
    print("  keys " + ", ".join(f"{k} {v}" for k, v in s["accounting"].items()))
    for key in s["failed"]:
        detail = next((t["detail"] for t in report["tensors"] if t["key"] == key), "")
        print(f"  FAILED {key}: {detail}")
    for p in s["problems"]:
        print(f"  PROBLEM {p}")
    if report.get("seconds"):
        tp = report["throughput_gb_s"]
        print(
            f"  {human(report['bytes_in'])} in, {human(report['bytes_out'])} out in {report['seconds']:.1f} s "
            f"({tp['in']} GB/s in, {tp['out']} GB/s out)"
        )
