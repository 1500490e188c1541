"""Intrinsic dimension: d90 of parameter groups by random-subspace training, and the targets it recommends."""

import pandas as pd
import streamlit as st

from app import charts, forms, state
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import IntrinsicDimRequest
from core.intrinsic_dim import GROUP_SCHEMES, REPRESENTATION_ID_LABEL, IntrinsicDimConfig

DEFAULT_DATA = DataSpec(name="digits", img_size=56, n_train=500, n_val=200, n_test=None)
JOB_KEY = "measurement"  # also the page address parameter that finds the job again after a reload
TRIAL_COLUMNS = ["group", "d", "accuracy", "kind", "target"]
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
        request = IntrinsicDimRequest(
            data=DataSpec(**data_values),
            backbone=BackboneSpec(**backbone_values),
            groups=groups,
            config=IntrinsicDimConfig(**forms.coerce(IntrinsicDimConfig, config_values)),
            representation=representation,
        )
        state.remember(JOB_KEY, state.submit("intrinsic_dim", request))
    except ValueError as exc:
        st.error(str(exc))

run_id, started_here = state.current_job("intrinsic_dim", JOB_KEY)
past = state.store().list_runs(kind="intrinsic_dim")
if len(past):
    st.divider()
    labels = {
        r["id"]: f"{r['id']}  {r['status']}  {r['dataset.name']}  groups {r['method_options.groups']}"
        for _, r in past.iterrows()
    }
    ids = list(labels)
    chosen = st.selectbox(
        "Measurement (every measurement is kept in the run store)",
        ids,
        index=ids.index(run_id) if run_id in ids else 0,
        format_func=labels.get,
        key="id.selected",
    )
    started_here = started_here and chosen == run_id
    run_id = chosen
else:
    run_id = None
if run_id is not None:
    live = state.store().get_run(run_id)["status"] in ("queued", "running")

    @st.fragment(run_every=1.5 if live else None)
    def progress_panel() -> None:
        """Shows the trials so far while the measurement runs; reruns the page once when it ends."""
        store = state.store()
        run = store.get_run(run_id)
        active = run["status"] in ("queued", "running")
        if active:
            trials = pd.DataFrame((run["result"] or {}).get("trials", []), columns=TRIAL_COLUMNS)
            full = trials[trials["kind"] == "full"]
            if run["status"] == "queued":
                st.info(f"Measurement {run_id} is queued: number {store.queue_position(run_id)} for its resources.")
            else:
                st.info(f"Measurement {run_id} on {run['dataset']['name']}: {len(trials)} trials done.")
            targets = dict(zip(full["group"], full["target"], strict=True))
            st.plotly_chart(charts.intrinsic_dim_curves(trials, targets), key="id.live")
            asked = run["cancel_requested_at"] is not None
            if state.may_cancel(run, started_here) and st.button("Cancel", key="id.cancel", disabled=asked):
                status = store.request_cancel(run_id)
                st.toast("Cancelled." if status == "cancelled" else "Cancelling: it stops before its next step.")
        if live and not active:
            st.rerun(scope="app")

    progress_panel()

    run = state.store().get_run(run_id)
    result = run["result"] or {}
    if run["status"] not in ("queued", "running") and "groups" not in result:
        st.error(f"Measurement {run_id} {run['status']}: {run['message']}")
    elif "groups" in result:
        if result["cancelled"]:
            st.warning("The measurement was cancelled: the numbers below are partial.")
        st.caption(result["backbone"])
        table = pd.DataFrame(result["groups"])
        targets = dict(zip(table["group"], table["target"], strict=True))
        curves = pd.DataFrame(result["curves"])
        st.plotly_chart(charts.intrinsic_dim_curves(curves, targets, result["head_only_accuracy"]), key="id.curves")
        st.dataframe(table, hide_index=True, key="id.table")
        st.text(result["explanation"])
        for note in result["notes"]:
            st.caption(note)
        if result["recommended"]:
            st.success(f"Recommended targets: `{result['recommended']}`")
            if st.button("Fine-tune with these targets", key="id.use"):
                st.session_state["prefill_targets"] = result["recommended"]
                st.switch_page("app_pages/train.py")
        if result["representation"] is not None:
            with st.expander("Representation dimension per block (a different quantity)"):
                st.caption(REPRESENTATION_ID_LABEL)
                st.dataframe(pd.DataFrame(result["representation"]), hide_index=True, key="id.repr.table")
