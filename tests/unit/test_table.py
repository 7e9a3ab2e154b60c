"""`scaletrain table` through the real command line and through cli.main."""

import json
import subprocess
import sys

from scaletrain import cli
from scaletrain.configs import available
from scaletrain.models.table import TABLE_MODELS


# the real command in a fresh process, which also reports its peak memory: every table model is built on
# meta (no storage), so even GPT-3 175B must fit the whole run under 1 GiB. VmHWM is this process's own
# peak; ru_maxrss would carry over the peak of the (large, late in a suite) pytest process that spawned it.
RUN_TABLE = """
import re, sys, time
from scaletrain import cli
start = time.perf_counter()
code = cli.main(["table"])
status = open("/proc/self/status").read()
print(time.perf_counter() - start, re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), file=sys.stderr)
sys.exit(code)
"""


def test_table_prints_every_row_in_a_subprocess_in_under_1_gib():
    result = subprocess.run([sys.executable, "-c", RUN_TABLE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seconds, peak_kib = result.stderr.split()
    assert float(seconds) < 60 and int(peak_kib) < 1024 * 1024  # KiB
    assert set(TABLE_MODELS) <= set(available("model"))
    lines = result.stdout.splitlines()
    assert lines[0].split()[:7] == ["model", "layers", "width", "heads", "documented", "computed", "diff"]
    assert [line.split()[0] for line in lines[1:]] == list(TABLE_MODELS)
    gpt2 = next(line for line in lines if line.startswith("gpt2_124m "))
    assert "124,439,808" in gpt2 and "+6.4%" in gpt2  # the paper said 117M
    assert "174,604,259,328" in next(line for line in lines if line.startswith("gpt3_175b "))


def test_table_json_rows(capsys):
    assert cli.main(["table", "--format", "json", "t5_11b", "bert_base"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == ["t5_11b", "bert_base"]
    assert {"name", "family", "layers", "width", "heads", "params", "documented_params"} <= set(rows[0])
    t5, bert = rows
    assert (t5["family"], t5["layers"], t5["width"], t5["heads"]) == ("encdec", 24, 1024, 128)
    assert t5["params"] == 11_307_321_344 and t5["documented_params"] == 11e9
    assert bert["params"] == 109_482_240 and bert["family"] == "bert"


def test_unknown_model_and_bad_flag_exit_2_with_one_line(capsys):
    assert cli.main(["table", "gpt5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'gpt5'" in err and "gpt3_175b" in err
    assert cli.main(["table", "--format", "xml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format" in err
