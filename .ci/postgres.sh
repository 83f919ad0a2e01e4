# Sourced by .ci/run (`source .ci/postgres.sh`): gives the approval store
# tests a PostgreSQL to run against as well as SQLite. Installs PostgreSQL
# from Debian when missing, starts its cluster listening on 127.0.0.1 only,
# recreates a throwaway database and exports AUTOPOIESIS_TEST_DATABASE_URL.
# Without that variable the same tests run against SQLite only.
#
# Sourced, not run, so it stays sourceable: no `exit`, and it leaves the
# caller's shell options alone.

ci_pg_user=autopoiesis_ci
ci_pg_password=autopoiesis_ci
ci_pg_database=autopoiesis_test

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "== installing PostgreSQL"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# The newest installed major version, and its cluster (created if missing).
ci_pg_version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
if ! pg_lsclusters -h | awk -v v="$ci_pg_version" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
    pg_createcluster "$ci_pg_version" main >/dev/null
fi
# Debian's postgresql.conf reads conf.d/: listen on loopback only.
echo "listen_addresses = '127.0.0.1'" >"/etc/postgresql/$ci_pg_version/main/conf.d/autopoiesis-ci.conf"
ci_pg_port=$(pg_conftool -s "$ci_pg_version" main show port)
if ! pg_lsclusters -h | awk -v v="$ci_pg_version" '$1 == v && $2 == "main" && $4 == "online" { found = 1 } END { exit !found }'; then
    pg_ctlcluster "$ci_pg_version" main start
fi
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$ci_pg_port" && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$ci_pg_port"

runuser -u postgres -- psql -q -p "$ci_pg_port" -v ON_ERROR_STOP=1 <<SQL
SET client_min_messages = warning;
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ci_pg_user') THEN
        CREATE ROLE $ci_pg_user LOGIN PASSWORD '$ci_pg_password';
    END IF;
END
\$\$;
DROP DATABASE IF EXISTS $ci_pg_database WITH (FORCE);
CREATE DATABASE $ci_pg_database OWNER $ci_pg_user;
SQL

export AUTOPOIESIS_TEST_DATABASE_URL="postgres://$ci_pg_user:$ci_pg_password@127.0.0.1:$ci_pg_port/$ci_pg_database"
echo "== PostgreSQL $ci_pg_version on 127.0.0.1:$ci_pg_port, database $ci_pg_database"
unset ci_pg_user ci_pg_password ci_pg_database ci_pg_version ci_pg_port
