"""Drawing a captured network with graphviz (``rnet.draw`` / ``graph.draw.draw_network``).

The rendered SVG is parsed and compared with the network's own node list and ``networkx`` edges, and with channel
counts read off the original modules.
"""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from graph import capture
from graph.draw import draw_network
from models import SENet

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def senet():
    torch.manual_seed(0)
    model = SENet().eval()
    return model, capture(model, torch.rand(1, 3, 16, 16))


def _svg_groups(path, kind: str) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == kind]


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz's dot binary (apt-get install graphviz)")
def test_svg_has_one_box_per_node_and_one_arrow_per_edge_labelled_with_op_shape_and_channels(senet, tmp_path):
    model, rnet = senet
    path = rnet.draw(tmp_path / "senet.svg")
    assert path == str(tmp_path / "senet.svg")
    boxes = _svg_groups(path, "node")
    assert len(boxes) == len(rnet.graph_nodes)
    assert len(_svg_groups(path, "edge")) == rnet.to_networkx().number_of_edges()
    texts = {" ".join(t.text or "" for t in g.iter(f"{SVG}text")) for g in boxes}
    conv = next(t for t in texts if t.startswith("stem "))
    assert f"{model.stem.in_channels}→{model.stem.out_channels}" in conv and "Conv2d" in conv
    assert f"1x{model.stem.out_channels}x16x16" in conv


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz's dot binary (apt-get install graphviz)")
def test_format_argument_appends_its_extension_and_png_is_a_png(senet, tmp_path):
    _, rnet = senet
    path = draw_network(rnet, tmp_path / "graph", format="png")
    assert path == str(tmp_path / "graph.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.png"]


def test_without_dot_the_source_is_written_with_a_warning(senet, tmp_path, monkeypatch):
    _, rnet = senet
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="'dot' program is not installed"):
        path = rnet.draw(tmp_path / "senet.pdf")
    assert path == str(tmp_path / "senet.dot")
    source = open(path).read()
    assert source.startswith("digraph") and source.count("->") == rnet.to_networkx().number_of_edges()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["senet.dot"]


def test_unknown_format_is_refused(senet, tmp_path):
    _, rnet = senet
    with pytest.raises(ValueError, match="format 'bmp'"):
        rnet.draw(tmp_path / "graph", format="bmp")
