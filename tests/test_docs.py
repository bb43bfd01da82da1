"""The README lists every RECSVC_ setting the service reads."""

from pathlib import Path

from app.settings import Settings


def test_readme_lists_every_setting():
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    missing = [f"RECSVC_{name.upper()}" for name in Settings.model_fields
               if f"`RECSVC_{name.upper()}`" not in readme]
    assert not missing, f"README does not document {missing}"
