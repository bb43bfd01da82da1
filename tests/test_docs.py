"""The README lists every RECSVC_ setting the service reads."""

from pathlib import Path

from app.settings import Settings


def test_readme_lists_every_setting():
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    missing = [f"RECSVC_{name.upper()}" for name in Settings.model_fields
               if f"`RECSVC_{name.upper()}`" not in readme]
    assert not missing, f"README does not document {missing}"


def test_the_api_reference_and_the_served_openapi_name_the_same_operations():
    """docs/api.md is the users' contract: every operation it names is served, and
    every served /v1 operation is in it (the reference once named endpoints that
    did not exist)."""
    import re

    from app.server.api import create_app

    text = Path(__file__).resolve().parents[1].joinpath("docs", "api.md").read_text()
    documented = {(m, p.rstrip("/")) for m, p in
                  re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)", text)}
    served = {(method.upper(), path)
              for path, ops in create_app(Settings()).openapi()["paths"].items()
              for method in ops}
    assert documented - served == set(), "documented but not served"
    assert {op for op in served if op[1].startswith("/v1/")} - documented == set(), \
        "served but not documented"
