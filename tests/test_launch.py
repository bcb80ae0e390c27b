"""What the launcher fixes before options reach workers: absolute local paths, the local runner."""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_caption.options import LOCAL_RUNNER, CaptionOptions, prepare_launch


def test_local_path_flags_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = PipelineOptions(["--output", "out", "--image_root", "../images",
                               "--cache_dir", "gs://bucket/cache", "--runner", "PortableRunner"])
    prepare_launch(options)
    flags = options.view_as(CaptionOptions)
    assert flags.output == str(tmp_path / "out")
    assert flags.image_root == os.path.normpath(tmp_path / ".." / "images")
    assert flags.cache_dir == "gs://bucket/cache"
    assert options.view_as(StandardOptions).runner == "PortableRunner"  # a named runner is kept
    # what workers receive is the absolute form, not the launcher's working directory
    assert options.get_all_options()["output"] == str(tmp_path / "out")


def test_no_runner_named_means_the_offline_local_runner(tmp_path):
    options = PipelineOptions(["--output", str(tmp_path)])
    prepare_launch(options)
    assert options.view_as(StandardOptions).runner == LOCAL_RUNNER == "FnApiRunner"
