"""PETLab's router: st.navigation over the pages, nothing else."""

import streamlit as st

st.set_page_config(page_title="PETLab", page_icon=":material/tune:", layout="wide")
pages = [st.Page("app_pages/methods.py", title="Methods", icon=":material/science:", default=True)]
st.navigation(pages).run()
