# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are installed first (deepspeed builds against them); override freely
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.reelforge-installed

.PHONY: setup system demo test test-fast lint bench clean

setup: system $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	$(PIP) install -q -e '.[test]'
	@# peers the tests compare against, each in its own venv so their pins never move ours
	@test -x $(VENV)/peers/datatrove/bin/python || $(PYTHON) -m venv $(VENV)/peers/datatrove
	$(VENV)/peers/datatrove/bin/pip install -q "datatrove[processing]" spacy orjson
	@# the released Keye-VL processors, side by side (no deps: numpy, pillow and torch stay the project's)
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/peers/keye-vl-utils-1.0.0 "keye-vl-utils==1.0.0" \
	  decord requests urllib3 idna certifi charset-normalizer
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/peers/keye-vl-utils-1.5.2 "keye-vl-utils==1.5.2" \
	  decord requests urllib3 idna certifi charset-normalizer opencv-python-headless
	@touch $(STAMP)

# A Java runtime Spark 4 accepts (17 or 21), ffmpeg/ffprobe, bubblewrap (the think-with-image
# sandbox's namespaces), and what the data-task builders use: espeak-ng (speech for the demo's
# videos), Noto CJK fonts (synthetic OCR), Tesseract with its English and Simplified Chinese
# data (the OCR legibility test) and headless Chromium with its driver (the report's HTML is opened in
# a real browser by the tests): system packages when we are root.
system:
	@java_ok=0; if command -v java >/dev/null 2>&1; then \
	  v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1); \
	  [ -n "$$v" ] && [ "$$v" -ge 17 ] && java_ok=1; fi; \
	need=""; [ $$java_ok = 1 ] || need="$$need openjdk-17-jre-headless"; \
	command -v ffprobe >/dev/null 2>&1 && command -v ffmpeg >/dev/null 2>&1 || need="$$need ffmpeg"; \
	command -v bwrap >/dev/null 2>&1 || need="$$need bubblewrap"; \
	command -v espeak-ng >/dev/null 2>&1 || need="$$need espeak-ng"; \
	command -v tesseract >/dev/null 2>&1 || need="$$need tesseract-ocr tesseract-ocr-eng"; \
	test -f /usr/share/tesseract-ocr/5/tessdata/chi_sim.traineddata || need="$$need tesseract-ocr-chi-sim"; \
	fc-list 2>/dev/null | grep -qi "Noto Sans CJK" || need="$$need fonts-noto-cjk fontconfig"; \
	command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || need="$$need chromium chromium-driver"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$need"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  else \
	    echo "reelforge needs:$$need (a Java 17/21 runtime for Spark, ffmpeg with ffprobe, bubblewrap for the sandbox, espeak-ng, Tesseract with eng and chi_sim, Noto CJK fonts); install them with your package manager, e.g. 'sudo apt-get install$$need', then re-run make." >&2; exit 1; \
	  fi; \
	fi

demo: setup
	$(VENV)/bin/reelforge demo --out demo-out

# everything (under 15 minutes on 2 cores); test-fast: no Spark, no training runs, nothing slow (under 2)
# two pytest workers (the tests wait on Spark, ffmpeg and subprocesses as much as they compute); the
# local-cluster parity tests share one worker and one cluster (xdist_group "cluster", set in conftest)
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

FAST := not spark and not cluster and not train and not slow
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "$(FAST)" --durations=10

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PIP) install -q -e '.[test,bench]'
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf demo-out .pytest_cache
