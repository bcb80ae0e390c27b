"""beam_caption: caption very large image collections with OpenAI-compatible VLMs on Apache Beam."""

from setuptools import find_packages, setup

GCP = ["apache-beam[gcp]>=2.77.0,<3", "google-cloud-secret-manager>=2.20"]
S3 = ["s3fs>=2024.1", "apache-beam[aws]>=2.77.0,<3"]  # s3fs reads, Beam's S3 filesystem writes

setup(
    name="beam_caption",
    version="0.1.0",
    description="Caption large image collections with OpenAI-compatible vision-language models "
                "on Apache Beam (DirectRunner, Dataflow, Flink, Spark).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # asyncio.timeout; CI runs 3.11
    packages=find_packages(include=["beam_caption", "beam_caption.*"]),
    package_data={"beam_caption": ["sample_data/*.json", "sample_data/images/*"]},
    install_requires=[
        "apache-beam>=2.77.0,<3",
        "openai>=3.57,<4",
        "pillow>=11",
        "fsspec>=2024.1",
        "gcsfs>=2024.1",
        "aiohttp>=3.9",
        "jsonschema>=4",  # structured output: answers checked against their JSON schema
        "google-re2>=1.1",  # schema patterns matched without backtracking (structured.py)
        "pyyaml>=6",  # --prompts_file
        "tqdm>=4.66",
    ],
    extras_require={
        # the tests cover the Dataflow dry run, Secret Manager keys and jobs on gs:// and s3://
        # (against emulators on loopback): the gcp and s3 extras' packages and the emulators
        # (pytest-xdist: the suite in a test process per core, see pytest.ini)
        "test": ["pytest>=8", "pytest-xdist>=3.6", "httpx2", "ruff==0.17.6", "mypy==2.4.1",
                 "pyarrow>=14", *GCP, *S3, "gcp-storage-emulator>=2024.8", "moto[server]>=5"],
        # Dataflow, --dry_run, and --api_key_secret (Secret Manager, read on the workers)
        "gcp": GCP,
        "s3": S3,
        # --output_format parquet (Beam's Parquet sink; apache-beam installs pyarrow today)
        "parquet": ["pyarrow>=14"],
    },
    entry_points={"console_scripts": ["beam-caption=beam_caption.__main__:main"]},
)
