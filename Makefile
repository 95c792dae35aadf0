# One entry point for people and CI. `make test` is what CI runs.
CARGO ?= cargo
STACK := $(CARGO) run --quiet -p whist-test-support --bin stack --

BIN := $${CARGO_TARGET_DIR:-target}/debug

.PHONY: run stack session status test check lint fmt bench bench-dbclient bench-host bench-scaling bench-fleet engine postgres moto nextest clean

## run: the whole fleet on this machine: stack, scaling-service, host-service processes and their mandelboxes; Ctrl-C stops it all
run: engine postgres
	$(CARGO) build --workspace --bins --quiet
	$(BIN)/local-fleet

## session: play one client session against the running local fleet (assign, config, ports and key, end)
session:
	$(CARGO) run --quiet -p whist-client --bin whist -- session

## status: regions, hosts and mandelboxes by state of the running local fleet
status:
	$(CARGO) run --quiet -p whist-client --bin whist -- status

## stack: only the database and the GraphQL engine (no seed data), printing their URLs
stack: engine postgres
	$(STACK) up

## test: format and lint checks, then every test tier against one shared local stack
test: engine moto check nextest
	@# One workspace build, so the stack binary shares the tests' features and nothing rebuilds.
	$(CARGO) build --workspace --all-targets --quiet
	$${CARGO_TARGET_DIR:-target}/debug/stack exec -- $(CARGO) nextest run --workspace --no-fail-fast

## check: formatting and clippy, warnings are errors
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: print every benchmark's figures (database client, host-service on Docker, scaling-service)
bench: bench-dbclient bench-host bench-scaling

## bench-dbclient: stack start-up, round trips, claims/s, live-query latency
bench-dbclient: engine
	$(CARGO) run --release -p whist-dbclient --example dbclient_bench

## bench-host: zygote creation vs bare Docker, assignment latencies, resident memory
bench-host: engine
	$(CARGO) build --release -p host-service --bin host-service --example host_bench
	./target/release/examples/host_bench

## bench-scaling: assignments/s at 32 and 128 clients, decide() on 10,000 hosts, event → launch
bench-scaling: engine moto
	$(CARGO) run --release -p scaling-service --example decide_bench
	$(CARGO) run --release -p scaling-service --example scaling_bench

## postgres: make sure PostgreSQL 15 is installed (apt as root; otherwise says what to run)
postgres:
	@bash scripts/install-postgres.sh

## engine: install the Hasura-dialect GraphQL engine once per machine (cached outside the repo)
engine:
	@bash scripts/install-postrust.sh >/dev/null

## moto: install moto's server (the local EC2 API for the scaling-service tests) once per machine
moto:
	@bash scripts/install-moto.sh >/dev/null

nextest:
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
