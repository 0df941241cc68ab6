# `make run` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: run test lint servers demo bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit("sidetrace needs Python >= 3.10" if sys.version_info < (3, 10) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.agent: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[agent]'
	@touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[agent,test]'
	@touch $@ $(VENV)/.agent

## run: start the agent in the foreground (built-in defaults, or CONFIG=path/to/sidetrace.toml)
run: $(VENV)/.agent
	$(BIN)/sidetrace run $(if $(CONFIG),--config $(CONFIG))

## servers: install what the tests use from Debian: prometheus, tcpdump (and libpcap, for capture
## filters), iproute2 (network namespaces for the packet tests), openssl (test certificates), dnsmasq
## (a DNS server for the load-balancing exporter's discovery test), systemd (systemd-analyze for the unit
## tests), python3-venv and libseccomp2 (the agent installed from the wheel into a venv of /usr/bin/python3,
## run under the unit's seccomp filter)
servers:
	@missing=""; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v tcpdump >/dev/null 2>&1 || missing="$$missing tcpdump"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v dnsmasq >/dev/null 2>&1 || missing="$$missing dnsmasq-base"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	ldconfig -p | grep -q 'libseccomp\.so\.2 ' || missing="$$missing libseccomp2"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(APT_INSTALL) $$missing; fi

lint: $(VENV)/.test
	$(BIN)/ruff check sidetrace tests bench examples

## test: install everything the tests need and run the whole suite
test: $(VENV)/.test servers lint
	$(BIN)/python -m pytest -q

## demo: start the example system in examples/ (real nats-server, Temporal dev server and agent; stand-in daprd),
## place one order and print its trace; exits non-zero if the trace is not whole
demo: $(VENV)/.test
	$(BIN)/python examples/run_demo.py

## bench: run the benchmarks in bench/ against their peers; results go to bench/RESULTS.md by hand
PYTHON313 ?= $(shell command -v python3.13 || echo $(HOME)/.pyenv/versions/3.13.0/bin/python)
BENCH313 := .bench313

$(BENCH313)/bin/python:
	$(PYTHON313) -m venv $(BENCH313)
	$(BENCH313)/bin/python -m pip install -q nats-py opentelemetry-sdk otel-instrumentation-nats -e .

# The contrib aiohttp-client instrumentation (the Dapr benchmark's peer) pins an older OpenTelemetry
# than the test venv's, so the Dapr benchmark's workers get a venv of their own.
BENCHDAPR := .benchdapr
OTEL_PEER_API := 1.45.1
OTEL_PEER_CONTRIB := 0.66b1

$(BENCHDAPR)/bin/python:
	$(PYTHON) -m venv $(BENCHDAPR)
	$(BENCHDAPR)/bin/python -m pip install -q opentelemetry-api==$(OTEL_PEER_API) \
		opentelemetry-sdk==$(OTEL_PEER_API) opentelemetry-instrumentation==$(OTEL_PEER_CONTRIB) \
		opentelemetry-instrumentation-grpc==$(OTEL_PEER_CONTRIB) \
		opentelemetry-instrumentation-aiohttp-client==$(OTEL_PEER_CONTRIB) dapr -e .

# The peer of `sidetrace instrument`: opentelemetry-instrument with opentelemetry-distro, which registers
# a configurator of its own, so both launchers get a venv apart from the test venv, with the same
# OpenTelemetry versions and the same instrumentations installed (Flask's and threading's).
BENCHLAUNCHER := .benchlauncher

$(BENCHLAUNCHER)/bin/python:
	$(PYTHON) -m venv $(BENCHLAUNCHER)
	$(BENCHLAUNCHER)/bin/python -m pip install -q opentelemetry-sdk==$(OTEL_PEER_API) \
		opentelemetry-distro==$(OTEL_PEER_CONTRIB) opentelemetry-exporter-otlp-proto-grpc==$(OTEL_PEER_API) \
		opentelemetry-instrumentation-flask==$(OTEL_PEER_CONTRIB) flask -e '.[sdk]'

bench: $(VENV)/.test servers $(BENCH313)/bin/python $(BENCHDAPR)/bin/python $(BENCHLAUNCHER)/bin/python
	@command -v prometheus-node-exporter >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(APT_INSTALL) prometheus-node-exporter; }
	$(BIN)/python bench/agent_idle.py
	$(BIN)/python bench/trace_relay.py
	$(BIN)/python bench/nats_overhead.py
	$(BIN)/python bench/temporal_overhead.py
	$(BIN)/python bench/dapr_overhead.py
	$(BIN)/python bench/dapr_call_path.py
	$(SUDO) $(BIN)/python bench/netsample_rate.py
	$(BIN)/python bench/launcher_overhead.py
	$(BIN)/python bench/remote_write_cost.py
	$(BIN)/python bench/exposition_cost.py

clean:
	rm -rf $(VENV) $(BENCH313) $(BENCHDAPR) $(BENCHLAUNCHER) .pytest_cache .ruff_cache
