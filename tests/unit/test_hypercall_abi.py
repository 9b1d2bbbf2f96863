"""The hypercall channel's message limits and the paged domain list."""

from __future__ import annotations

import pytest

from xmp.hypercall import DOMAININFO_PAGE, MAX_MESSAGE, MessageTooBig, domain_info_list, encode


def test_a_message_larger_than_the_channel_is_refused_by_name():
    with pytest.raises(MessageTooBig) as err:
        encode({"ret": "x" * MAX_MESSAGE})
    assert err.value.size > MAX_MESSAGE and "exceeds 65536" in str(err.value)
    assert len(encode({"ret": "x" * (MAX_MESSAGE - 20)})) <= MAX_MESSAGE


@pytest.mark.parametrize("count", [0, 1, DOMAININFO_PAGE - 1, DOMAININFO_PAGE, DOMAININFO_PAGE + 1, 1000])
def test_the_domain_list_is_read_a_page_at_a_time(count):
    domids = [0] + [3 * i + 1 for i in range(count)]  # gaps: destroyed domains leave holes
    pages = []

    def call(op, cmd, first_domain, max_domains):
        assert (op, cmd, max_domains) == ("sysctl", "getdomaininfolist", DOMAININFO_PAGE)
        page = [{"domid": d} for d in domids if d >= first_domain][:max_domains]
        pages.append(len(page))
        return page

    assert [i["domid"] for i in domain_info_list(call)] == domids
    assert len(pages) == len(domids) // DOMAININFO_PAGE + 1 and max(pages) <= DOMAININFO_PAGE


def test_a_full_page_of_the_widest_records_fits_one_message():
    widest = {"domid": 0x7FEF, "name": "n" * 64, "uuid": "u" * 36, "state": "shutdown",
              "state_letters": "---sc-", "shutdown_reason": "soft_reset", "mem_kb": 1 << 40,
              "maxmem_kb": 1 << 40, "vcpus": 32, "cpu_time": 123456789.123, "console_port": 4095,
              "console_gref": 0, "store_port": 4095, "driver_domain": False,
              "exit": "exited with status 255"}
    assert len(encode({"ret": [widest] * DOMAININFO_PAGE})) < MAX_MESSAGE
