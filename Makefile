# Two commands on a fresh Linux machine (see README):
#   make demo   set up .venv (CPU torch) and run `r2au demo`
#   make test   set up .venv, the virtual display for GUI tests, and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch for this project's machines; for CUDA see README ("GPU install").
TORCH_SPEC ?= torch==2.13.0
APT_PACKAGES := xvfb xauth libgl1 libegl1 libdbus-1-3 libfontconfig1 libxkbcommon-x11-0 \
	libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
	libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libxcb-cursor0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# bioimageio.core (the reference test of bioimage.io packages) in an environment of its own:
# its newest release pins a bioimageio.spec that fails with the pydantic napari installs
CORE_VENV ?= .venv-bioimageio
CORE_REQUIREMENTS := "bioimageio.core==0.11.0" "pydantic<2.12" onnxruntime

.PHONY: setup demo test system-deps lint clean bioimageio-core

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { command -v apt-get >/dev/null && \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test,dicom,nifti,export,fast]"
	touch $@

demo: setup
	$(BIN)/r2au demo

# Xvfb and the X/GL libraries Qt needs for napari's canvas in GUI tests.
system-deps:
	@if command -v Xvfb >/dev/null && command -v xauth >/dev/null; then echo "Xvfb present"; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	else echo "error: install Xvfb and the libxcb/xkbcommon libraries for Qt with your package manager"; exit 1; fi

bioimageio-core: $(CORE_VENV)/.installed

$(CORE_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q $(CORE_REQUIREMENTS)
	touch $@

test: setup system-deps lint bioimageio-core
	R2AU_BIOIMAGEIO_CORE=$(CORE_VENV)/bin/bioimageio $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check napari_r2au training tests benchmarks
	$(BIN)/ruff format --check napari_r2au training tests benchmarks

clean:
	rm -rf $(VENV) $(CORE_VENV) build dist *.egg-info r2au-demo
