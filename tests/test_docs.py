"""Documentation that is generated from the code must match it."""
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_md_is_generated_from_the_config_comments():
    mod = runpy.run_path(str(ROOT / "scripts" / "config_docs.py"))
    assert (ROOT / "docs" / "configuration.md").read_text() == mod["render"](), \
        "docs/configuration.md is stale: run python scripts/config_docs.py"


def test_every_config_field_has_a_comment():
    import dataclasses

    from imagine_flash.config import DistillConfig, PretrainConfig
    mod = runpy.run_path(str(ROOT / "scripts" / "config_docs.py"))
    source = (ROOT / "src" / "imagine_flash" / "config.py").read_text()
    for cls in (DistillConfig, PretrainConfig):
        documented = {name: comment for name, _, _, comment in mod["fields"](source, cls.__name__)}
        assert set(documented) == {f.name for f in dataclasses.fields(cls)}
        assert all(documented.values()), [n for n, c in documented.items() if not c]
