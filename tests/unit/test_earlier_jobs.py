"""A restarted Slurm driver recognises the live jobs a dead earlier run of the same workflow left (cluster.earlier)."""

from __future__ import annotations

from upcycling.cluster.earlier import earlier_jobs, parse_squeue

SQUEUE = """\
101|RUNNING|3f2a|rule_dense_final_wildcards_xs_0_8192|/work/sweep
102|PENDING|3f2a|rule_upcycled_final_wildcards_xs_0_8192_8192|/work/sweep/
103|RUNNING|9c1d|rule_dense_final_wildcards_xs_0_8192|/work/other-sweep
104|RUNNING|interactive||/work/sweep
105|COMPLETED|3f2a|rule_fit|/work/sweep
106|RUNNING|3f2a|rule_not_ours|/work/sweep
"""


def test_only_live_jobs_of_this_workflow_and_directory_are_earlier_jobs():
    queued = parse_squeue(SQUEUE)
    assert [job.rule for job in queued] == ["dense_final", "upcycled_final", "dense_final", "", "fit", "not_ours"]
    found = earlier_jobs(queued, "/work/sweep", ["dense_final", "upcycled_final", "fit"])
    # Another directory's sweep, a job without the plugin's comment, a finished job and another
    # workflow's rule are left alone.
    assert [job.job_id for job in found] == ["101", "102"]
    assert {job.run_id for job in found} == {"3f2a"}


def test_a_directory_reached_by_a_symlink_is_the_same_directory(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sweep")
    queued = parse_squeue(f"7|RUNNING|r1|rule_dense_final_wildcards_xs_0_8192|{tmp_path / 'link'}\n")
    assert [job.job_id for job in earlier_jobs(queued, str(tmp_path / "sweep"), ["dense_final"])] == ["7"]
