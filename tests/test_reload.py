"""relay.reload in process: the next delivery sees the new policy, new sessions the new
TLS context and users; a config error changes nothing."""

from __future__ import annotations

from pathlib import Path

import yaml

from relay import app as appmod
from relay import config
from relay.config import TlsLevel
from relay.reload import reload
from tests.config.test_load import write_config


def test_policy_users_and_context_swapped_only_when_valid(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    path = write_config(tmp_path, server_cert, policy={"mta_sts": False, "dane": False})
    app = appmod.build(config.load(path))
    deliverer = app.scheduler.deliverer
    old_context = app.ssl_context
    doc = yaml.safe_load(path.read_text())
    doc["policy"]["domains"] = {"partner.test": {"level": "secure"}}
    path.write_text(yaml.safe_dump(doc))
    assert reload(app)
    policy = deliverer.policy  # type: ignore[attr-defined]
    assert policy.domains["partner.test"].level is TlsLevel.SECURE
    assert app.ssl_context is not old_context
    assert all(x._settings.ssl_context is app.ssl_context for x in app.listeners)
    doc["policy"]["default"] = {"level": "none"}
    path.write_text(yaml.safe_dump(doc))
    assert not reload(app)
    assert deliverer.policy is policy  # type: ignore[attr-defined]
