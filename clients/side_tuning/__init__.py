"""Server-assisted side-tuning (MobiLLM, PAE MobiLLM), a method in its own folder.

``tuning`` is the client behaviour (``conf/client/side_tuning.yaml``), ``network`` the side
networks over the frozen backbone, ``link`` the device-server activation link, ``quantize`` its
low-bit payloads and ``label_attack`` what a curious server can infer from them.
"""

from fedsim.clients.side_tuning.tuning import SideTuning

__all__ = ["SideTuning"]
