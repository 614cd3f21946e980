"""The API app in a process where torch, transformers and deepspeed cannot be imported.

`python -m tests.service.api_without_torch DATA_DIR` (from the checkout): blocks those imports (the
hook of tests/service/no_torch_api.py), builds the app on a fresh DATA_DIR, then uploads preference
data, creates a job and asks for an estimate through it (in process, over httpx's ASGI transport);
checks that none of the blocked modules was loaded and prints "ok".
Run by tests/service/test_settings_db.py::test_the_api_process_never_imports_torch.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.service.no_torch_api import BLOCKED, Block


def main(argv: list[str] | None = None) -> None:
    [data_dir] = sys.argv[1:] if argv is None else argv
    sys.meta_path.insert(0, Block())
    # imported only now, with the block in place
    import httpx

    from service.api.app import create_app
    from service.db.session import session_scope
    from service.services.keys import create_key
    from service.settings import Settings

    settings = Settings(data_dir=Path(data_dir))
    app = create_app(settings)
    with session_scope(settings.db_url) as s:
        key = create_key(session=s, tenant="t")[1]

    async def calls() -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://api",
            headers={"Authorization": "Bearer " + key},
        ) as c:
            rows = b'{"prompt": "a?", "chosen": "b", "rejected": "c"}\n' * 200
            f = await c.post("/v1/files", files={"file": ("p.jsonl", rows)}, data={"purpose": "fine-tune"})
            assert f.status_code == 200, f.text
            j = await c.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny-opt-xs",
                    "reward_model": "tiny-opt-xs",
                    "training_file": f.json()["id"],
                    "preset": "tiny",
                },
            )
            assert j.status_code == 200, j.text
            e = await c.post("/v1/fine_tuning/jobs/estimate", json={"model": "tiny-opt-xs"})
            assert e.status_code == 200, e.text

    asyncio.run(calls())
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
    print("ok")


if __name__ == "__main__":
    main()
