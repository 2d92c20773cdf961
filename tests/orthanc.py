"""A real PACS for the tests: Orthanc (Debian ``orthanc``) with its DICOMweb plugin
(``orthanc-dicomweb``) on 127.0.0.1, free ports, a temporary storage folder, a user and
password (without them Orthanc would let anyone in)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import requests

from brainmri.local_servers import ServerProcess, free_ports, http_status

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DEBIAN_PACKAGES = ("orthanc", "orthanc-dicomweb")


def missing() -> str | None:
    """Why Orthanc cannot run here, None when it can."""
    if not (shutil.which("Orthanc") or Path(ORTHANC).exists()) or not DICOMWEB_PLUGIN.exists():
        return (
            f"Orthanc with DICOMweb is not installed (apt-get install {' '.join(DEBIAN_PACKAGES)};"
            " `make test` does so as root)"
        )
    return None


class LocalOrthanc(ServerProcess):
    """One Orthanc process; its DICOMweb root is :attr:`dicomweb_url`."""

    name = "Orthanc"

    def __init__(self, data_dir: Path, user: str, password: str) -> None:
        super().__init__(Path(data_dir) / "orthanc.log")
        self.data_dir = Path(data_dir)
        self.user, self.password = user, password
        self.http_port, self.dicom_port = free_ports(2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def command(self) -> list[str]:
        config = {
            "Name": "brainmri-tests",
            "StorageDirectory": str(self.data_dir / "storage"),
            "IndexDirectory": str(self.data_dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.data_dir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [shutil.which("Orthanc") or ORTHANC, str(path)]

    def ready(self) -> bool:
        return http_status(f"{self.url}/app/explorer.html") in (200, 401)

    def start(self, timeout_s: float = 60.0) -> LocalOrthanc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.launch(timeout_s)
        return self

    def upload(self, data: bytes) -> None:
        """Store one DICOM instance (Orthanc's REST API)."""
        answer = requests.post(
            f"{self.url}/instances", data=data, auth=(self.user, self.password), timeout=30
        )
        answer.raise_for_status()

    def __enter__(self) -> LocalOrthanc:
        return self.start()
