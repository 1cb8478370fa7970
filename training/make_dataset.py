"""Training data generation: join the rows the node served (with the exact feature vectors it
scored) to the events that followed, one label per action within an attribution window.

    python training/make_dataset.py --logs data/train/logs --out training/out/dataset.parquet
"""
import argparse
import glob
import json
import os
import sys

HEADS = ["click", "like", "share", "hide"]


def served_files(logs):
    return sorted(glob.glob(os.path.join(logs, "served*.jsonl")))


def check_schema(logs, pick=None):
    """The feature names of the served rows to use. Each row names the schema it was written with
    (feature_schema.<id>.json); rows without one (written before schemas were versioned), rows
    naming a schema file that is not there, or rows of several schemas are refused: their columns
    cannot be labelled with certainty. --schema ID uses only the rows of that one schema."""
    counts = {}
    for f in served_files(logs):
        with open(f) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                sid = json.loads(line).get("schema")
                if not sid:
                    sys.exit(f"{f}:{n}: served row without a schema id (written before feature schemas were versioned); refusing to guess its columns")
                counts[sid] = counts.get(sid, 0) + 1
    if not counts:
        sys.exit(f"no served rows under {logs}")
    if pick is None and len(counts) > 1:
        listed = ", ".join(f"{k} ({v} rows)" for k, v in sorted(counts.items()))
        sys.exit(f"served rows of several feature schemas: {listed}; choose one with --schema ID")
    sid = pick if pick is not None else next(iter(counts))
    if sid not in counts:
        sys.exit(f"no served rows of schema {sid}; present: {', '.join(sorted(counts))}")
    path = os.path.join(logs, f"feature_schema.{sid}.json")
    if not os.path.isfile(path):
        sys.exit(f"schema {sid} is unknown: {path} is missing")
    return sid, json.load(open(path))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", required=True, help="<data_dir>/logs of the node that served")
    ap.add_argument("--out", required=False, default="training/out/dataset.parquet")
    ap.add_argument("--window-secs", type=int, default=1800, help="attribution window after serving")
    ap.add_argument("--schema", help="use only served rows of this feature schema id")
    ap.add_argument("--check-schema", action="store_true", help="only check the schemas and print the one in use")
    a = ap.parse_args()

    schema, names = check_schema(a.logs, a.schema)
    print(f"feature schema {schema}: {len(names)} features")
    if a.check_schema:
        return
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The node rotates its logs (served.jsonl, served.1.jsonl, ...): read every generation.
    def read(stem):
        files = sorted(glob.glob(os.path.join(a.logs, f"{stem}*.jsonl")))
        return pd.concat([pd.read_json(f, lines=True) for f in files if os.path.getsize(f) > 0], ignore_index=True)

    served = read("served")
    served = served[served["schema"] == schema].reset_index(drop=True)
    events = read("events")
    events = events[events["request_id"].astype(str) != ""]
    print(f"served rows: {len(served)}, attributed events: {len(events)}")

    feats = np.array(served["features"].tolist(), dtype=np.float32)
    if feats.shape[1] != len(names):
        raise SystemExit(f"feature rows have {feats.shape[1]} values, schema has {len(names)}")
    df = pd.DataFrame(feats, columns=names)
    for col in ["request_id", "user_id", "item_id", "position", "served_at_ms", "scored_by"]:
        df[col] = served[col].values

    ev = events.rename(columns={"event_time_ms": "t"})
    ev["action"] = ev["action"].replace({"report": "hide"})
    joined = df[["request_id", "item_id", "served_at_ms"]].reset_index().merge(
        ev[["request_id", "item_id", "action", "t"]], on=["request_id", "item_id"], how="inner"
    )
    ok = (joined["t"] >= joined["served_at_ms"] - 60_000) & (joined["t"] <= joined["served_at_ms"] + a.window_secs * 1000)
    joined = joined[ok]
    for h in HEADS:
        hit = set(joined.loc[joined["action"] == h, "index"].tolist())
        df[f"label_{h}"] = df.index.isin(hit).astype(np.int8)
    impressed = set(joined.loc[joined["action"] == "impression", "index"].tolist())
    df = df[df.index.isin(impressed)]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), a.out)
    rates = {h: round(float(df[f"label_{h}"].mean()), 4) for h in HEADS}
    print(f"wrote {len(df)} labelled rows to {a.out}; label rates {rates}")
    json.dump(names, open(os.path.join(os.path.dirname(a.out), "feature_names.json"), "w"))


if __name__ == "__main__":
    main()
