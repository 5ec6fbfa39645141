#!/usr/bin/env bash
# Sweep of the tiny preset's base pretraining (issue: base >= 0.9 on every prior suite).
# Runs variants of models/tiny (config edits) and of the training config side by side, each
# on 2 threads, for at most $SWEEP_SECONDS, and prints every variant's evaluations.
#
#     bash tools/sweep/tiny_base.sh TESSERA_BIN OUT_DIR [VARIANT...]
#
# A variant is NAME (see `variant` below). Each writes OUT_DIR/NAME/metrics.jsonl.
set -u
BIN=$1; OUT=$2; shift 2
STEPS=${SWEEP_STEPS:-2000}
SECONDS_CAP=${SWEEP_SECONDS:-420}
mkdir -p "$OUT"

# Prints "MODEL_EDIT_JSON|--set ARGS" for a variant.
variant() {
    case $1 in
        base) echo '{}|' ;;
        lr3e-3) echo '{}|--set optim.lr=3e-3 --set optim.min_lr=3e-4' ;;
        img112) echo '{}|--set data.image_size=112' ;;
        patch7) echo '{"vision_config.patch_size":7}|' ;;
        vit128) echo '{"vision_config.hidden_size":128,"vision_config.intermediate_size":256,"vision_config.depth":4,"vision_config.num_heads":4}|' ;;
        theta100) echo '{"text_config.rope_parameters.rope_theta":100.0}|' ;;
        theta10) echo '{"text_config.rope_parameters.rope_theta":10.0}|' ;;
        theta10-img84) echo '{"text_config.rope_parameters.rope_theta":10.0}|--set data.image_size=84' ;;
        theta10-img112) echo '{"text_config.rope_parameters.rope_theta":10.0}|--set data.image_size=112' ;;
        theta10-patch7) echo '{"text_config.rope_parameters.rope_theta":10.0,"vision_config.patch_size":7}|' ;;
        theta10-vit128) echo '{"text_config.rope_parameters.rope_theta":10.0,"vision_config.hidden_size":128,"vision_config.intermediate_size":256,"vision_config.depth":4,"vision_config.num_heads":4}|' ;;
        patch7-lr3e-3) echo '{"vision_config.patch_size":7}|--set optim.lr=3e-3 --set optim.min_lr=3e-4' ;;
        patch7-vit128) echo '{"vision_config.patch_size":7,"vision_config.hidden_size":128,"vision_config.intermediate_size":256,"vision_config.depth":4,"vision_config.num_heads":4}|' ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
}

pids=()
for name in "$@"; do
    spec=$(variant "$name") || continue
    edit=${spec%%|*}; sets=${spec#*|}
    dir="$OUT/$name"; mkdir -p "$dir/model"
    python3 - "$edit" "$dir/model/config.json" <<'PY'
import json, sys
edit = json.loads(sys.argv[1]); cfg = json.load(open("models/tiny/config.json"))
for key, value in edit.items():
    node = cfg
    *path, last = key.split(".")
    for p in path: node = node[p]
    node[last] = value
json.dump(cfg, open(sys.argv[2], "w"), indent=1)
PY
    cp models/tiny/tokenizer.json "$dir/model/"
    cat > "$dir/run.toml" <<TOML
[model]
dir = "$dir/model"
init_seed = 0
[data]
train = "mix:all"
eval = ["suite:colour", "suite:shape", "suite:count", "suite:position", "suite:ocr", "suite:rank", "suite:facts"]
eval_samples = 64
jigsaw_prompt = "plain"
[optim]
lr = 0.001
min_lr = 0.0001
schedule = "cosine"
warmup_steps = 100
max_grad_norm = 1.0
[train]
batch_size = 32
eval_every = $(( STEPS / 4 ))
save_every = 100000
log_every = 100
progress = false
TOML
    # shellcheck disable=SC2086
    timeout "$SECONDS_CAP" "$BIN" --threads 2 train sft --config "$dir/run.toml" --steps "$STEPS" \
        --out "$dir/run" $sets > "$dir/log.txt" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
for name in "$@"; do
    python3 - "$OUT/$name/run/metrics.jsonl" "$name" <<'PY'
import json, sys
path, name = sys.argv[1:3]
try:
    lines = [json.loads(l) for l in open(path)]
except OSError:
    print(f"{name}: no metrics"); sys.exit()
last = max((d.get("step", 0) for d in lines), default=0)
for d in lines:
    ev = {k[5:]: round(v, 2) for k, v in d.items() if k.startswith("eval/") and "/reward" not in k}
    if ev:
        print(f"{name} step {d['step']}: " + " ".join(f"{k} {v}" for k, v in ev.items()))
print(f"{name}: reached step {last}")
PY
done
