# Two commands do all set-up on a fresh machine:
#   make demo   answer the bundled spoken question about the bundled picture: the released weights (downloaded
#               once into ./checkpoint), or, where they cannot be fetched, the embedded demo model
#   make test   run the whole test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CKPT    ?= checkpoint

# Debian packages the tests use: espeak-ng (synthetic speech), chromium + driver (the web page's test),
# g++ (builds omnitalk's CPU kernels; usually already there)
SYSDEPS := espeak-ng chromium chromium-driver g++

.PHONY: install sysdeps test test-fast demo parity bench train-small train-codec clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

sysdeps:
	@missing=""; for c in espeak-ng chromium chromedriver g++; do command -v $$c >/dev/null || missing=yes; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS) >/dev/null; \
	  else echo "note: install $(SYSDEPS) (Debian) to run the speech-synthesis and browser tests"; fi; \
	fi

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/omnitalk chat --checkpoint $(CKPT) --audio omnitalk/demo_model/question.wav --image omnitalk/demo_model/scene.png --out answer.wav

parity: $(STAMP)
	$(BIN)/python -m omnitalk.testing.parity tests/fixtures/parity --manifests tests/fixtures/parity/manifests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --preset mini-omni2 --random-weights --mode all --json benchmarks/results.json

train-small: $(STAMP) sysdeps
	$(BIN)/python scripts/train_small.py --recipe configs/small-recipe.yaml --docs-img docs/img

train-codec: $(STAMP) sysdeps
	$(BIN)/omnitalk train-codec configs/codec-small.yaml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
