"""PETLab's router: st.navigation over the pages, and the sign-in button where sign-in is configured.

The page icon is an emoji, which the browser draws itself: a ``:material/...:`` page icon would be fetched from
Google's font server (the pages' Material icons come from the font Streamlit serves itself).
"""

import streamlit as st

from app import state

st.set_page_config(page_title="PETLab", page_icon="🎛️", layout="wide")
pages = {
    "Library": [
        st.Page("app_pages/methods.py", title="Methods", icon=":material/science:", default=True),
        st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
    ],
    "Train": [
        st.Page("app_pages/train.py", title="Fine-tune", icon=":material/model_training:"),
        st.Page("app_pages/runs.py", title="Runs", icon=":material/list:"),
        st.Page("app_pages/sweeps.py", title="Sweeps", icon=":material/grid_view:"),
    ],
    "Analyse": [
        st.Page("app_pages/spectra.py", title="Spectra", icon=":material/insights:"),
        st.Page("app_pages/pareto.py", title="Pareto", icon=":material/scatter_plot:"),
        st.Page("app_pages/intrinsic_dim.py", title="Intrinsic dimension", icon=":material/tune:"),
    ],
}
if state.sign_in_configured():
    with st.sidebar:
        if state.user_email() is None:
            st.caption("Sign in to start jobs and upload images; anyone may look.")
            st.button("Sign in", key="auth.login", on_click=st.login)
        else:
            st.caption(f"Signed in as {state.user_email()}")
            st.button("Sign out", key="auth.logout", on_click=st.logout)
st.navigation(pages).run()
