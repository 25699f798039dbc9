{{/* RBAC: what kopf and kubedpo_operator.kube call, nothing more. */}}

{{/* Rules on namespaced objects: a ClusterRole cluster-wide, a Role per watched namespace otherwise. */}}
{{- define "kubedpo.rbac.namespacedRules" -}}
# DPOJobs: kopf watches and patches them (finalizers, progress annotations); TTL deletes them.
- apiGroups: [kubedpo.io]
  resources: [dpojobs]
  verbs: [get, list, watch, patch, update, delete]
- apiGroups: [kubedpo.io]
  resources: [dpojobs/status]
  verbs: [get, patch, update]
- apiGroups: [kubedpo.io]
  resources: [dpojobs/finalizers]
  verbs: [update]
# Each attempt's children: Indexed Job, headless Service, config ConfigMap.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, delete]
# Pod state explains failures (reasons, exit codes) in DPOJob conditions.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# kopf posts transitions as events (kubectl describe dpoj).
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if and .Values.peering.enabled (not (include "kubedpo.clusterwide" .)) }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{/* Rules on cluster-scoped objects, needed in both modes. */}}
{{- define "kubedpo.rbac.clusterRules" -}}
# kopf discovers the resources it serves by watching CRDs.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
{{- if include "kubedpo.clusterwide" . }}
# kopf lists namespaces when it serves the whole cluster.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- if .Values.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
{{- end }}
