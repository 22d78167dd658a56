# tlsgate: `make run` sets up and runs the daemons on the embedded SQLite database;
# `make test` sets up and runs every test, ruff and mypy. Both work on a fresh Debian 12 as root.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VAR ?= $(CURDIR)/var
DEB_PACKAGES := python3-venv python3-dev gcc postfix libmilter-dev swaks miltertest postfwd sqlite3 systemd
PYTEST_ARGS ?=

.PHONY: all deps debs venv run demo test lint typecheck pytest sql man clean bench

all: test

# Debian packages: installed only when missing, so `make` stays fast on a ready machine.
# Postfix is preseeded to "No configuration": tlsgate never touches /etc/postfix.
debs: $(VENV)/.debs
$(VENV)/.debs:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: as root, install:$$missing" >&2; exit 1; fi; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: $(VENV)/.debs setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[postgresql,mariadb,test]'
	touch $@

deps: venv

$(VAR)/tlsgate.conf:
	mkdir -p $(VAR)
	printf '%s\n' '[database]' 'url = sqlite:///$(VAR)/rules.sqlite' 'poll_interval = 1' '' \
	  '[policyd]' 'listen = unix:$(VAR)/policy.sock inet:127.0.0.1:10040' 'socket_mode = 0666' '' \
	  '[milter]' 'listen = unix:$(VAR)/milter.sock' 'socket_mode = 0666' '' \
	  '[engine]' '# no Postfix is configured here to ask for its myorigin' 'myorigin = none' '' \
	  '[log]' 'target = stderr' > $@

$(VAR)/rules.sqlite: | $(VAR)/tlsgate.conf venv
	$(BIN)/tlsgate -c $(VAR)/tlsgate.conf db init --examples sql/examples.sql

# The daemons in the foreground on var/rules.sqlite; Ctrl-C stops both. Rows changed with
# `sqlite3 var/rules.sqlite` or `.venv/bin/tlsgate -c var/tlsgate.conf connector ...` apply at once.
run: venv $(VAR)/rules.sqlite
	@$(BIN)/tlsgate -c $(VAR)/tlsgate.conf connector list
	@echo; $(BIN)/tlsgate -c $(VAR)/tlsgate.conf postfix-config --queue-directory $(VAR) --no-outbound
	@echo; echo "tlsgate-policyd: unix:$(VAR)/policy.sock and inet:127.0.0.1:10040; tlsgate-milter: unix:$(VAR)/milter.sock"
	@echo "Ctrl-C stops both."; echo
	@trap 'kill $$policyd $$milter 2>/dev/null; wait' INT TERM EXIT; \
	  $(BIN)/tlsgate-policyd -c $(VAR)/tlsgate.conf & policyd=$$!; \
	  $(BIN)/tlsgate-milter -c $(VAR)/tlsgate.conf & milter=$$!; \
	  wait

# A private Postfix on loopback with both daemons and the example connectors: a few messages
# from a partner, a spoofer and an ordinary sender, and what happened to each.
demo: venv
	$(BIN)/python -m tests.support.demo

lint: venv
	$(BIN)/ruff check tlsgate policyd milter tests $(wildcard bench)

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

test-reliability: venv
	TLSGATE_WRITE_REPORT=1 $(BIN)/pytest -m reliability $(PYTEST_ARGS)

bench: venv
	$(BIN)/pip install -q matplotlib && $(BIN)/python -m bench.run

sql: venv
	for d in sqlite postgresql mariadb; do $(BIN)/tlsgate db schema --dialect $$d > sql/$$d.sql; done

# Manual pages: docs/man/*.rst is the one source; the built pages are committed so that the
# package installs them (setup.cfg data_files), and a test keeps them current.
man: venv
	for f in docs/man/*.rst; do $(BIN)/python -m docutils --writer=manpage $$f $${f%.rst}; done

clean:
	rm -rf $(VENV) $(VAR) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
