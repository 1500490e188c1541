"""PETLab's router: st.navigation over the pages, nothing else."""

import streamlit as st

# The favicon is an emoji, which the browser draws locally: a :material: icon would be fetched from Google.
st.set_page_config(page_title="PETLab", page_icon="🔬", layout="wide")
pages = {
    "Library": [
        st.Page("app_pages/methods.py", title="Methods", icon=":material/science:", default=True),
        st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
    ],
    "Train": [
        st.Page("app_pages/train.py", title="Fine-tune", icon=":material/model_training:"),
        st.Page("app_pages/runs.py", title="Runs", icon=":material/list:"),
    ],
    "Analyse": [
        st.Page("app_pages/spectra.py", title="Spectra", icon=":material/insights:"),
        st.Page("app_pages/pareto.py", title="Pareto", icon=":material/scatter_plot:"),
        st.Page("app_pages/intrinsic_dim.py", title="Intrinsic dimension", icon=":material/tune:"),
    ],
}
st.navigation(pages).run()
