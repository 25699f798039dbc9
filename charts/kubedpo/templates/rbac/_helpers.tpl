{{/* RBAC: what kopf and kubedpo_operator.kube call, nothing more. */}}

{{/* Rules on namespaced objects: a ClusterRole cluster-wide, a Role per watched namespace otherwise. */}}
{{- define "kubedpo.rbac.namespacedRules" -}}
# Least privilege: tests/operator/test_rbac_vs_code.py fails when a verb here is not used by the
# code (kube.py's client calls and kopf's recorded requests), or the code uses one not granted.
# DPOJobs: kopf lists, watches and patches them (progress annotations); kube.py reads them and
# deletes them at ttlSecondsAfterFinished.
# DPOPipelines create their stages as DPOJobs (pipeline_kube.py) and patch the running stage's
# runPolicy.suspend.
- apiGroups: [kubedpo.io]
  resources: [dpojobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [kubedpo.io]
  resources: [dpojobs/status]
  verbs: [patch]
# Not a call: the API server requires it to set blockOwnerDeletion on children owned by a DPOJob
# (and on stage DPOJobs owned by a DPOPipeline).
- apiGroups: [kubedpo.io]
  resources: [dpojobs/finalizers, dpopipelines/finalizers]
  verbs: [update]
# DPOPipelines: kopf lists, watches and patches them (progress annotations); the controller reads
# them and writes their status.
- apiGroups: [kubedpo.io]
  resources: [dpopipelines]
  verbs: [get, list, watch, patch]
- apiGroups: [kubedpo.io]
  resources: [dpopipelines/status]
  verbs: [patch]
# Each attempt's children: Indexed Job (listed to find this DPOJob's attempts, watched for its
# state, patched for suspend), headless Service, config ConfigMap.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, create, delete]
# Why a gang is Pending: its pods' conditions, and the Job's FailedCreate events.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# kopf.event posts transitions as events (kubectl describe dpoj); the Job's events are read.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- if .Values.networkPolicy.enabled }}
# One NetworkPolicy per attempt (netpol.py), created before its Job and deleted with it.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, delete]
{{- end }}
{{- if and .Values.peering.enabled (not (include "kubedpo.clusterwide" .)) }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{/* Rules on cluster-scoped objects, needed in both modes. */}}
{{- define "kubedpo.rbac.clusterRules" -}}
# kopf discovers the resources it serves by listing and watching CRDs.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if and (include "kubedpo.clusterwide" .) .Values.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
