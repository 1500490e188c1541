"""Intrinsic dimension: d90 of parameter groups by random-subspace training, and the targets it recommends."""

import pandas as pd
import streamlit as st

from app import charts, forms, state
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.intrinsic_dim import GROUP_SCHEMES, REPRESENTATION_ID_LABEL, IntrinsicDimConfig

DEFAULT_DATA = DataSpec(name="digits", img_size=56, n_train=500, n_val=200, n_test=None)
JOB_KEY = "id.job"
CUSTOM = "custom"

st.title("Intrinsic dimension")
st.write(
    "KAdaptation chooses the submodules to adapt by their local intrinsic dimension: train only d random directions "
    "of a group's weights (Li et al. 2018) and find d90, the smallest d reaching 90% of training the whole group. "
    "Groups with a low d90 adapt with few degrees of freedom."
)

st.subheader("Data")
data_values = forms.data_inputs("id.data", DEFAULT_DATA)
st.subheader("Backbone")
backbone_values = forms.backbone_inputs("id.backbone")
st.subheader("Groups")
scheme = st.selectbox(
    "Groups to compare",
    [*GROUP_SCHEMES, CUSTOM],
    key="id.scheme",
    format_func=lambda s: f"{s}: {GROUP_SCHEMES[s]}" if s in GROUP_SCHEMES else "custom: targets strings",
)
groups: str | tuple[str, ...] = scheme
if scheme == CUSTOM:
    text = st.text_input("Groups, separated by |", value="q,v | fc1,fc2", key="id.custom")
    groups = tuple(g.strip() for g in text.split("|") if g.strip())
with st.expander("Measurement settings"):
    config_values = forms.dataclass_form(IntrinsicDimConfig, key="id.config", columns=4)
representation = st.checkbox(
    "Also estimate each block's representation dimension (one forward pass; a different quantity)", key="id.repr"
)

if st.button("Measure", type="primary", key="id.start"):
    try:
        request = state.IntrinsicDimRequest(
            data=DataSpec(**data_values),
            backbone=BackboneSpec(**backbone_values),
            groups=groups,
            config=IntrinsicDimConfig(**forms.coerce(IntrinsicDimConfig, config_values)),
            representation=representation,
        )
        st.session_state[JOB_KEY] = state.start_intrinsic_dim(request).id
    except ValueError as exc:
        st.error(str(exc))

job = state.current_job("intrinsic_dim", JOB_KEY)
if job is not None:
    st.divider()
    live = job.active

    @st.fragment(run_every=1.5 if live else None)
    def progress_panel() -> None:
        """Shows the trials so far while the sweep runs; reruns the page once when it ends."""
        current = state.job(job.id)
        assert current is not None
        trials = pd.DataFrame(current.trials, columns=["group", "d", "accuracy", "kind", "target"])
        full = trials[trials["kind"] == "full"]
        targets = dict(zip(full["group"], full["target"], strict=True))
        if current.active:
            st.info(f"{current.title}: {current.phase}, {len(trials)} trials done.")
            st.plotly_chart(charts.intrinsic_dim_curves(trials, targets), key="id.live")
            if st.button("Cancel", key="id.cancel", disabled=current.token.cancelled):
                current.cancel()
                st.toast("Cancelling: the sweep stops before its next training step.")
        if live and not current.active:
            st.rerun(scope="app")

    progress_panel()

    if not job.active and job.error:
        st.error(job.error)
    elif not job.active:
        outcome: state.IntrinsicDimOutcome = job.result
        result = outcome.result
        if result.cancelled:
            st.warning("The measurement was cancelled: the numbers below are partial.")
        st.caption(outcome.backbone)
        table = result.table()
        targets = dict(zip(table["group"], table["target"], strict=True))
        st.plotly_chart(charts.intrinsic_dim_curves(result.curves, targets, result.head_only_accuracy), key="id.curves")
        st.dataframe(table, hide_index=True, key="id.table")
        st.text(result.explanation)
        for note in result.notes:
            st.caption(note)
        if result.recommended:
            st.success(f"Recommended targets: `{result.recommended}`")
            if st.button("Fine-tune with these targets", key="id.use"):
                st.session_state["prefill_targets"] = result.recommended
                st.switch_page("app_pages/train.py")
        if outcome.representation is not None:
            with st.expander("Representation dimension per block (a different quantity)"):
                st.caption(REPRESENTATION_ID_LABEL)
                st.dataframe(outcome.representation, hide_index=True, key="id.repr.table")
