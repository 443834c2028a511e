# The whole set-up on a fresh Debian machine: `make demo`, `make test`.
# Each installs what is missing: the Debian servers, a .venv with packmule.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install servers-installed demo test bench lint clean

servers-installed:
	@if ! command -v beanstalkd >/dev/null || ! command -v memcached >/dev/null \
	    || ! command -v etcd >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    beanstalkd memcached etcd-server >/dev/null; \
	fi

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

install: servers-installed $(STAMP)

demo: install
	$(VENV)/bin/packmule demo

# pytest exits 5 when it collected no test: that is a failure here too.
test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py

lint: install
	$(VENV)/bin/ruff check packmule tests examples benchmarks
	$(VENV)/bin/mypy packmule

clean:
	rm -rf $(VENV) *.egg-info
