"""Training data generation: join the rows the node served (with the exact feature vectors it
scored) to the events that followed, one label per action within an attribution window.

    python training/make_dataset.py --logs data/train/logs --out training/out/dataset.parquet
"""
import argparse
import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

HEADS = ["click", "like", "share", "hide"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", required=True, help="<data_dir>/logs of the node that served")
    ap.add_argument("--out", required=True)
    ap.add_argument("--window-secs", type=int, default=1800, help="attribution window after serving")
    a = ap.parse_args()

    names = json.load(open(os.path.join(a.logs, "feature_schema.json")))
    # The node rotates its logs (served.jsonl, served.1.jsonl, ...): read every generation.
    def read(stem):
        files = sorted(glob.glob(os.path.join(a.logs, f"{stem}*.jsonl")))
        return pd.concat([pd.read_json(f, lines=True) for f in files if os.path.getsize(f) > 0], ignore_index=True)

    served = read("served")
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
