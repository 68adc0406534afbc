# Two commands on a fresh machine:
#   make story   set up .venv and run a story on the built-in tiny preset (or MODEL=converted_dir)
#   make test    set up .venv with the dev extras and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STORY ?= examples/lighthouse_keepers.txt
OUT ?= out/story
MODEL ?=
PYTEST_ARGS ?=

.PHONY: story test venv browser clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, from the local wheel; nothing below may replace it or add torchvision.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@if $(PY) -c 'import torchvision' 2>/dev/null; then echo 'torchvision got installed: remove it'; exit 1; fi
	touch $@

venv: $(VENV)/.installed

story: venv
	$(PY) -m infer.story --story $(STORY) --out $(OUT) --overwrite $(if $(MODEL),--model $(MODEL),)

# The web app's browser test drives Debian's chromium through chromium-driver: installed here when missing and
# when run as root (CI); elsewhere that test skips and says why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      || echo "could not install chromium/chromium-driver: the browser test will skip"; \
	  else echo "chromium/chromium-driver missing and not root: the browser test will skip"; fi; fi

test: venv browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out
