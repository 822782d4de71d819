"""The dev stack's env file: its fixed form, and reading it back like a shell would."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tether_dev import envfiles


def render(state_dir: Path, bin_dir: Path | None = None) -> str:
    return envfiles.render(
        kubeconfig=state_dir / "kubeconfig",
        consul_http_addr="http://127.0.0.1:21001",
        etcd_endpoints="http://127.0.0.1:21002",
        state_dir=state_dir,
        bin_dir=bin_dir,
    )


def test_the_first_three_lines_have_the_form_design_md_fixes() -> None:
    text = render(Path("/work/.tether/dev"), Path("/work/.tether/dev/bin"))
    assert text.splitlines() == [
        "export KUBECONFIG=/work/.tether/dev/kubeconfig",
        "export CONSUL_HTTP_ADDR=http://127.0.0.1:21001",
        "export ETCD_ENDPOINTS=http://127.0.0.1:21002",
        "export TETHER_DEV_DIR=/work/.tether/dev",
        "export PATH=/work/.tether/dev/bin:$PATH",
    ]


def test_parse_expands_path_from_the_given_environment() -> None:
    env = envfiles.parse(render(Path("/s"), Path("/s/bin")), {"PATH": "/usr/bin:/bin"})
    assert env == {
        "KUBECONFIG": "/s/kubeconfig",
        "CONSUL_HTTP_ADDR": "http://127.0.0.1:21001",
        "ETCD_ENDPOINTS": "http://127.0.0.1:21002",
        "TETHER_DEV_DIR": "/s",
        "PATH": "/s/bin:/usr/bin:/bin",
    }


def test_parse_without_a_path_line_sets_no_path() -> None:
    assert "PATH" not in envfiles.parse(render(Path("/s")), {"PATH": "/bin"})


def test_parse_follows_shell_quoting() -> None:
    text = "\n".join(
        [
            "# a comment",
            "export A='it'\"'\"'s $HOME'",
            'export B="$A and ${HOME}"',
            "export C=\\$HOME",
            "export D=$UNSET",
            "not an export line",
        ]
    )
    assert envfiles.parse(text, {"HOME": "/root"}) == {
        "A": "it's $HOME",
        "B": "it's $HOME and /root",
        "C": "$HOME",
        "D": "",
    }


# Any path a file system allows (no NUL), including spaces, quotes and dollars.
paths = st.text(
    alphabet=st.characters(exclude_characters="\0\n\r", exclude_categories=["Cs"]),
    min_size=1,
    max_size=40,
).map(lambda name: Path("/tmp") / name)


@given(state_dir=paths)
def test_rendered_paths_read_back_unchanged(state_dir: Path) -> None:
    env = envfiles.parse(render(state_dir, state_dir / "bin"), {"PATH": "/usr/bin"})
    assert env["KUBECONFIG"] == str(state_dir / "kubeconfig")
    assert env["TETHER_DEV_DIR"] == str(state_dir)
    assert env["PATH"] == f"{state_dir / 'bin'}:/usr/bin"
