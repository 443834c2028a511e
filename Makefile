# The whole set-up on a fresh Debian machine: `make demo`, `make test`.
# Each first runs `install`, which adds only what is missing: the Debian
# servers (beanstalkd, memcached, etcd-server), chromium and its driver (the
# dashboard's browser test) and a .venv with packmule, its dashboard and tools.
# A second `install` does nothing and takes well under a second.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
PY := $(VENV)/bin/python
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k fibonacci -x"`.
PYTEST_ARGS ?=
# Extra arguments for the benchmarks, e.g. `make bench BENCH_ARGS=--quick`.
BENCH_ARGS ?=

# The stamp's name carries a hash of the packaging files: edit setup.cfg (new
# dependency, new extra) and the next `make` reinstalls; otherwise it is a no-op.
DEPS_HASH := $(shell cat setup.cfg pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
# The servers may live in /usr/sbin, which a normal user's PATH may not hold.
FIND := PATH="$$PATH:/usr/sbin:/sbin" command -v

.PHONY: install system-packages demo test bench lint clean

# The packages' postinst scripts may start system-wide servers on the default
# ports. packmule's tests and demo start their own on free ports, so these are
# only in the way: stop them and keep them from starting at boot. Best effort,
# and only right after we installed the packages (never someone's own servers).
STOP_SYSTEM_SERVICES := for service in beanstalkd memcached etcd; do \
	  if [ -d /run/systemd/system ]; then \
	    $(SUDO) systemctl disable --now "$$service" >/dev/null 2>&1 || true; \
	  elif [ -x "/etc/init.d/$$service" ]; then \
	    $(SUDO) "/etc/init.d/$$service" stop >/dev/null 2>&1 || true; \
	  fi; \
	done

install: system-packages $(STAMP)

# Debian packages, only when a binary (or python3 with venv) is missing.
# openssl: the tests make certificates for an etcd that serves TLS.
# chromium and chromium-driver: the dashboard's test drives a real browser.
system-packages:
	@missing=""; \
	$(FIND) beanstalkd >/dev/null || missing="$$missing beanstalkd"; \
	$(FIND) memcached >/dev/null || missing="$$missing memcached"; \
	$(FIND) etcd >/dev/null || missing="$$missing etcd-server"; \
	$(FIND) openssl >/dev/null || missing="$$missing openssl"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	command -v python3 >/dev/null || missing="$$missing python3"; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(APT) update -qq; \
	  $(APT) install -y -qq --no-install-recommends $$missing; \
	  $(STOP_SYSTEM_SERVICES); \
	fi
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "packmule needs Python 3.11 or later; python3 is $$(python3 -V)" >&2; exit 1; }

$(STAMP):
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev,web]'
	@rm -f $(VENV)/.installed*
	@touch $@

demo: install
	$(VENV)/bin/packmule demo

# pytest exits 5 when it collected no test. make fails on any non-zero exit,
# so "no tests" is a failure here too: never mask it with `|| true`.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check packmule tests examples benchmarks initializers
	$(VENV)/bin/mypy packmule

clean:
	rm -rf $(VENV) *.egg-info
