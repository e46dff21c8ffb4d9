"""The forwarder's answer to pynetdicom 3.0.4's lost C-STORE response.

pynetdicom's association reactor could take the response meant for the thread
that sent the request, and that thread then waited for the DIMSE timeout (see
``_ResponsesForSender`` in :mod:`bridge.dicom.forwarder`). With small instances
storescp answers within milliseconds, which is when the loss was most frequent:
in about one association of 400 in two before the fix.
"""

import queue
import threading

from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import C_STORE

from bridge.dicom.forwarder import Destination, Outcome, _ResponsesForSender, forward
from tests.support.studies import make_study

ROUNDS = 4
INSTANCES = 400


def _request() -> tuple[int, C_STORE]:
    msg = C_STORE()
    msg.MessageID = 7
    return 1, msg


def _response() -> tuple[int, C_STORE]:
    msg = C_STORE()
    msg.MessageIDBeingRespondedTo = 7
    msg.Status = 0x0000
    return 1, msg


def _poll(msg_queue: queue.Queue):
    """Poll ``msg_queue`` as pynetdicom's reactor does; "empty" when nothing."""
    try:
        return msg_queue.get(block=False)
    except queue.Empty:
        return "empty"


def test_reactor_thread_never_takes_a_response():
    msg_queue = _ResponsesForSender(threading.current_thread())
    msg_queue.put(_response())

    polled = _poll(msg_queue)

    assert polled == "empty"
    sender = []
    thread = threading.Thread(target=lambda: sender.append(msg_queue.get(timeout=5)))
    thread.start()
    thread.join(10)
    assert sender[0][1].MessageIDBeingRespondedTo == 7


def test_reactor_thread_still_takes_a_request_from_the_peer():
    msg_queue = _ResponsesForSender(threading.current_thread())
    msg_queue.put(_request())

    _, msg = msg_queue.get(block=False)

    assert msg.MessageID == 7


def test_abort_sentinel_is_left_for_the_waiting_sender():
    msg_queue = _ResponsesForSender(threading.current_thread())
    msg_queue.put((None, None))

    assert _poll(msg_queue) == "empty"
    assert msg_queue.qsize() == 1


def test_hundreds_of_small_instances_go_over_one_association_every_round(
    tmp_path, storescp
):
    # A short DIMSE timeout keeps a regression from costing 10 s a round; it
    # would show as a second association and a resent instance.
    dest = Destination("pacs", "PACS", "127.0.0.1", storescp.port, dimse_timeout=3.0)
    sent = []
    for n in range(ROUNDS):
        files = make_study(
            tmp_path / f"in{n}",
            series=1,
            per_series=INSTANCES,
            study_uid=generate_uid(),
        )
        sent += files

        result = forward(dest, files)

        assert result.count(Outcome.DELIVERED) == INSTANCES, f"round {n}"
        assert result.associations == 1, f"round {n} reassociated"
    assert len(storescp.files()) == len(sent)
