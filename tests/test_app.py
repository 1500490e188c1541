"""Every page of the app renders without an exception (streamlit's AppTest, no browser)."""

from streamlit.testing.v1 import AppTest

from core import methods


def test_methods_page_lists_every_method_with_counts() -> None:
    at = AppTest.from_file("../app/streamlit_app.py", default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["method"]) == methods.list_methods()
    assert int(table.loc[table["method"] == "linear", "trainable (no head)"].iloc[0]) == 0
