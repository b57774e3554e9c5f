#!/usr/bin/env bash
# The base install, as a new user gets it: `pip install .` (no extras, so no torch) into a fresh venv,
# then what the README's first commands do on the shipped model: serve the web app (health, the Info
# tab's model card, a captioned photo), `aicrl caption` and `aicrl index`. Everything runs outside the
# checkout, so the installed package is what is tested, not the source tree.
#     bash .ci/base_install_check.sh      (from anywhere; about 1-3 minutes, most of it pip)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
server=""
cleanup() {
  if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "base install check FAILED: $*" >&2; [[ -f "$work/serve.log" ]] && tail -n 30 "$work/serve.log" >&2; exit 1; }
step() { echo "base install check: $*"; }

step "python3 -m venv + pip install . (no extras)"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$repo"
cd "$work"  # not the checkout: imports come from the installed package

step "torch is not installed"
if "$py" -c "import torch" 2>/dev/null; then fail "torch is importable in the base install"; fi

samples="$repo/tests/samples"
photo="$(ls "$samples"/*.jpg | head -n 1)"
port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
step "aicrl serve --port $port"
"$work/venv/bin/aicrl" serve --port "$port" --db "$work/serve/gallery.db" >"$work/serve.log" 2>&1 &
server=$!
PORT="$port" PHOTO="$photo" SERVER="$server" "$py" - <<'EOF' || fail "the web app"
import json, os, time, urllib.request, uuid

base = f"http://127.0.0.1:{os.environ['PORT']}"
deadline = time.monotonic() + 120
while True:  # the server loads the model and captions a warm-up photo first
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert json.load(r)["status"] == "ok"
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("no /healthz within 120 s")
        try:
            os.kill(int(os.environ["SERVER"]), 0)
        except ProcessLookupError:
            raise SystemExit("aicrl serve exited") from None
        time.sleep(1)
with urllib.request.urlopen(base + "/api/info", timeout=30) as r:
    info = json.load(r)
assert info["summary"] and "Flickr8k" in " ".join(info["summary"]), info.get("summary")
assert info["scores"]["factual"]["CIDEr"] > 0 and info["metrics"], "the model card has no scores"
assert info["backend"] == "onnx", info["backend"]
boundary = uuid.uuid4().hex
photo = open(os.environ["PHOTO"], "rb").read()
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
request = urllib.request.Request(base + "/api/captions", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
with urllib.request.urlopen(request, timeout=60) as r:
    caption = json.load(r)["captions"][0]["text"]
assert caption.strip(), "an empty caption"
print(f"  /healthz ok; /api/info: {info['summary'][1][:60]}...; caption: {caption!r}")
EOF

step "aicrl caption tests/samples --json"
"$work/venv/bin/aicrl" caption "$samples" --json >"$work/captions.jsonl" 2>"$work/caption.log" \
  || { cat "$work/caption.log" >&2; fail "aicrl caption"; }
"$py" -c "
import json, sys
lines = [json.loads(l) for l in open('$work/captions.jsonl')]
assert lines and all(l['captions'][0]['text'] for l in lines), lines
print(f'  {len(lines)} photos captioned')" || fail "aicrl caption's output"

step "aicrl index tests/samples"
"$work/venv/bin/aicrl" index "$samples" --db "$work/index/gallery.db" >"$work/index.json" 2>"$work/index.log" \
  || { cat "$work/index.log" >&2; fail "aicrl index"; }
"$py" -c "
import json
summary = json.load(open('$work/index.json'))
assert summary['indexed'] > 0 and summary['gallery_images'] == summary['indexed'] and not summary['unreadable'], summary
print(f\"  {summary['indexed']} photos indexed\")" || fail "aicrl index's summary"
step "passed"
