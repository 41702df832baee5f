"""What a run of coturn's `turnutils_uclient` says about the relay it ran against."""
import re


def relayed_all(output: str, messages: int) -> bool:
    """Whether every message came back: the run's final totals are `messages` sent and
    received, nothing was lost, and no STUN error response (4xx/5xx) was logged."""
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    return bool(totals) and totals[-1] == (str(messages), str(messages)) \
        and "Total lost packets 0 (" in output and not re.search(r"error [45]\d\d", output)
