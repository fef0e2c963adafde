# Two commands for a new user: `make demo` and `make test`.
# Everything is installed into .venv by this file; nothing else is needed but Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# A CPU build of torch by default, so no multi-GB CUDA wheel is pulled. For a GPU machine:
#   make TORCH_SPEC="torch" demo     (or install your CUDA torch into .venv first)
TORCH_SPEC ?= torch==2.13.0
CORES  ?= all

.PHONY: demo test test-slurm lint install install-test bench clean chromium slurm gguf-converter

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# llama.cpp's converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages), taken
# from the llama-cpp-python source distribution on the package registry, nothing compiled;
# `export.gguf: true` and the GGUF test use it. Unpacked beside itself, then renamed, so an
# interrupted download never leaves a converter that looks installed; tar -m dates the files
# now (not 2022, their date in the sdist), so make does not fetch them again on every run.
LLAMA_CPP_PYTHON ?= 0.3.36
GGUF_CONVERTER    = $(VENV)/llama.cpp/convert_hf_to_gguf.py
LLAMA_CPP_SRC     = llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp

$(GGUF_CONVERTER): $(BIN)/python
	rm -rf $(VENV)/llama.cpp.partial $(VENV)/llama.cpp-sdist && mkdir -p $(VENV)/llama.cpp.partial
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(VENV)/llama.cpp-sdist \
	  "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	tar -xzmf $(VENV)/llama.cpp-sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz \
	  -C $(VENV)/llama.cpp.partial --strip-components=3 \
	  $(LLAMA_CPP_SRC)/convert_hf_to_gguf.py $(LLAMA_CPP_SRC)/conversion $(LLAMA_CPP_SRC)/gguf-py \
	  $(LLAMA_CPP_SRC)/LICENSE
	rm -rf $(VENV)/llama.cpp $(VENV)/llama.cpp-sdist && mv $(VENV)/llama.cpp.partial $(VENV)/llama.cpp

gguf-converter: $(GGUF_CONVERTER)

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test $(GGUF_CONVERTER)

demo: install
	$(BIN)/snakemake --cores $(CORES)
	@echo
	@echo "Outputs are under results/demo/ (layout.json, analysis/, sweep.tsv, abliterated/)."
	@echo "HTML report: $(BIN)/snakemake --report results/report.html"

lint: install-test
	$(BIN)/ruff check src tests bench workflow/scripts
	$(BIN)/ruff format --check src tests bench workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

# The report test renders results/report.html in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
	      || echo "could not install chromium: the report rendering test will be skipped"; \
	  else echo "chromium missing and not root: the report rendering test will be skipped"; fi; }

# The SLURM test starts Debian's munged, mariadbd, slurmdbd, slurmctld and slurmd itself
# (tests/slurm_cluster.py); without root, apt or the packages it is skipped and says why.
SLURM_PACKAGES = slurmctld slurmd slurm-client slurmdbd munge mariadb-server
slurm:
	@{ command -v slurmctld && command -v slurmd && command -v slurmdbd && command -v sacct \
	    && command -v munged && command -v mariadbd; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(SLURM_PACKAGES); } \
	      || echo "could not install the SLURM packages: the SLURM test will be skipped"; \
	  else echo "SLURM missing and not root: the SLURM test will be skipped"; fi; }

# Two test workers (pytest-xdist): tests/conftest.py keeps the modules that share a long
# workflow run in one worker and orders the groups longest first (--no-loadscope-reorder:
# xdist would otherwise order them by their number of tests). TEST_WORKERS=0 runs
# everything in this process.
TEST_WORKERS ?= 2
test: install-test chromium slurm
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test-slurm: install-test slurm
	$(BIN)/python -m pytest -q -rs tests/test_slurm.py

bench: install-test
	$(BIN)/python bench/ablate_bench.py
	$(BIN)/python bench/measure_bench.py
	$(BIN)/python bench/sweep_bench.py

clean:
	rm -rf results resources .snakemake
