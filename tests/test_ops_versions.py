"""What differs between PostgreSQL 12 and 18 is decided by ``ops.versions.Pg`` alone: its answers for every
major, and, for the two majors installed here (the default one and 18), that the settings and initdb options it
chooses are ones those binaries know."""

from __future__ import annotations

import os
import pwd

import pytest

from srht_readonly.ops.observe import slots_query
from srht_readonly.ops.postgres import PostgresServer, find_bin_dir
from srht_readonly.ops.versions import NEWEST, OLDEST, Pg, parse_major
from srht_readonly.testing.servers import NODE_SETTINGS, node_settings
from tests._majors import new_major_bin

MAJORS = range(OLDEST, NEWEST + 1)


@pytest.mark.parametrize(("text", "major"), [
    ("postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)", 15),
    ("postgres (PostgreSQL) 18.6", 18),
    ("postgres (PostgreSQL) 18beta1", 18),
    ("PostgreSQL 12.22 on x86_64-pc-linux-gnu, compiled by gcc", 12),
    ("17\n", 17),
])
def test_parse_major_reads_postgres_version_version_and_pg_version(text, major):
    assert parse_major(text) == major


def test_parse_major_refuses_text_without_a_version():
    with pytest.raises(ValueError, match="no PostgreSQL version"):
        parse_major("bash: postgres: command not found")


def test_server_version_num_gives_the_major():
    assert [Pg.of(n).major for n in (120022, 130000, 150020, "180006")] == [12, 13, 15, 18]


@pytest.mark.parametrize("major", MAJORS)
def test_each_major_gets_the_wal_keep_setting_it_knows_and_the_slot_column_it_has(major):
    pg = Pg(major)
    if major == 12:
        assert pg.wal_keep(64) == {"wal_keep_segments": 4}  # 16 MB segments
        assert pg.slot_wal_status == "NULL::text"
    else:
        assert pg.wal_keep(64) == {"wal_keep_size": "64MB"}
        assert pg.slot_wal_status == "wal_status"
    assert pg.slot_wal_status in slots_query("pg_current_wal_lsn()", major * 10000 + 4)
    settings = node_settings(pg)
    assert ("wal_keep_segments" in settings) == (major == 12) and ("wal_keep_size" in settings) == (major > 12)
    assert settings.items() >= NODE_SETTINGS.items()


@pytest.mark.parametrize("major", MAJORS)
def test_initdb_checksum_options_turn_them_on_or_off_whatever_the_majors_default(major):
    pg = Pg(major)
    assert pg.initdb_checksums(None) == ()  # the major's default: off before 18, on from 18
    assert pg.initdb_checksums(True) == ("--data-checksums",)
    assert pg.initdb_checksums(False) == (("--no-data-checksums",) if major >= 18 else ())


def test_a_partial_megabyte_count_keeps_at_least_what_was_asked_on_12():
    assert Pg(12).wal_keep(1) == {"wal_keep_segments": 1}
    assert Pg(12).wal_keep(17) == {"wal_keep_segments": 2}


@pytest.mark.parametrize("which", ["default", "new"])
def test_the_installed_binaries_know_the_settings_and_initdb_options_chosen_for_their_major(which):
    bin_dir = find_bin_dir(None) if which == "default" else new_major_bin()
    me = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name  # postgres refuses root
    server = PostgresServer(bin_dir / "nowhere", bin=bin_dir, os_user=me)
    pg = server.pg()
    assert OLDEST <= pg.major <= NEWEST and (which == "default" or pg.major == 18)
    described = server.run("postgres", "--describe-config").stdout
    known = {line.split("\t", 1)[0] for line in described.splitlines()}
    assert set(node_settings(pg)) - known == set()
    initdb_help = server.run("initdb", "--help").stdout
    for enabled in (True, False):
        assert all(option in initdb_help for option in pg.initdb_checksums(enabled))
