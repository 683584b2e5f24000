"""tool_parser_plugin: loaded through vLLM's own plugin import, before names are checked."""

from __future__ import annotations

import pytest
import vllm  # noqa: F401  (explicit: vLLM's plugin mechanism is what is tested)

from backend.errors import InvalidArgument

PLUGIN = """
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser


@ToolParserManager.register_module("{name}")
class PluginParser(Hermes2ProToolParser):
    pass
"""


def test_a_plugin_file_registers_its_parser(tmp_path):
    from backend.parser_choice import import_tool_parser_plugin, known_parsers

    path = tmp_path / "unit_plugin_parser.py"
    path.write_text(PLUGIN.format(name="unit_plugin_parser"))
    assert "unit_plugin_parser" not in known_parsers()[0]
    import_tool_parser_plugin(str(path))
    assert "unit_plugin_parser" in known_parsers()[0]


def test_a_missing_or_broken_plugin_is_rejected(tmp_path):
    from backend.parser_choice import import_tool_parser_plugin

    with pytest.raises(InvalidArgument, match="no such file"):
        import_tool_parser_plugin(str(tmp_path / "absent.py"))
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('plugin says no')\n")
    with pytest.raises(InvalidArgument, match="failed to import"):
        import_tool_parser_plugin(str(broken))
    with pytest.raises(InvalidArgument, match="failed to import"):
        import_tool_parser_plugin("no_such_module_for_plugins")
