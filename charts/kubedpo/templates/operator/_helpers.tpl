{{/* Operator component: name, image, and the KUBEDPO_* env read by kubedpo_operator.settings. */}}

{{- define "kubedpo.operator.fullname" -}}
{{- include "kubedpo.fullname" . }}
{{- end }}

{{- define "kubedpo.operator.image" -}}
{{- include "kubedpo.imageRef" (list . .Values.image) }}
{{- end }}

{{- define "kubedpo.trainer.image" -}}
{{- include "kubedpo.imageRef" (list . .Values.trainer.image) }}
{{- end }}

{{/* One env var per OperatorSettings field the chart controls (tests check each maps to a field),
    plus POD_ID: kopf's peer identity, so the peering object names the active pod. */}}
{{- define "kubedpo.operator.env" -}}
- name: KUBEDPO_DEFAULT_IMAGE
  value: {{ include "kubedpo.trainer.image" . | quote }}
- name: KUBEDPO_NAMESPACES
  value: {{ join "," .Values.operator.watchNamespaces | quote }}
- name: KUBEDPO_PROGRESS_INTERVAL_S
  value: {{ .Values.operator.progressIntervalSeconds | quote }}
- name: KUBEDPO_OPERATOR_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: KUBEDPO_LIVENESS_ENDPOINT
  value: {{ printf "http://0.0.0.0:%v/healthz" .Values.operator.healthPort | quote }}
- name: KUBEDPO_PEERING_NAME
  value: {{ ternary .Values.peering.name "" .Values.peering.enabled | quote }}
- name: KUBEDPO_RUN_AS_USER
  value: {{ .Values.trainer.runAsUser | quote }}
- name: KUBEDPO_SHM_SIZE_LIMIT
  value: {{ .Values.trainer.shmSizeLimit | quote }}
- name: KUBEDPO_NETWORK_POLICY
  value: {{ .Values.networkPolicy.enabled | quote }}
- name: KUBEDPO_NETWORK_POLICY_METRICS_FROM
  value: {{ include "kubedpo.networkPolicy.metricsFrom" . | quote }}
- name: POD_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .Values.operator.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Peers allowed to reach trainer metrics: this chart's operator pods, plus networkPolicy.metricsFrom. */}}
{{- define "kubedpo.networkPolicy.metricsFrom" -}}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (fromYaml (include "kubedpo.selectorLabels" (list . "operator")))) -}}
{{- prepend .Values.networkPolicy.metricsFrom $operator | toJson -}}
{{- end }}
